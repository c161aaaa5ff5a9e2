"""sparse-detr-jax: JAX/Flax reference implementation of Sparse DETR (Roh et al., ICLR 2022)."""

from setuptools import find_packages, setup

setup(
  name="sparse-detr-jax",
  version="0.1.0",
  description="Sparse DETR (learnable encoder-token sparsity) in JAX/Flax, with official-checkpoint parity",
  packages=find_packages(include=["sparse_detr_jax", "sparse_detr_jax.*"]),
  python_requires=">=3.11",
  # Compatible ranges for projects that depend on this library; constraints.txt pins the exact versions
  # the suite passed with (`make install` uses it, `make lock` regenerates it).
  install_requires=[
    "jax>=0.10,<0.11",
    "jaxlib>=0.10,<0.11",
    "flax>=0.12,<0.13",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.12,<0.13",
    "numpy>=2.0,<3",
    "scipy>=1.13,<2",
    "pycocotools>=2.0.8,<3",
    "ml_collections>=1.0,<2",
    "absl-py>=2.1,<3",
    "pillow>=10.1,<14",  # ImageFont.load_default(size=...)
    "grain>=0.2.12,<0.3",
    "tensorflow-datasets>=4.9.7,<5",
    "array_record>=0.7,<0.9",
    "importlib_resources>=6",
    "tensorboardX>=2.6,<3",  # tensorflow-datasets imports it without declaring it
    "flatbuffers>=24,<26",  # jax.export serialization (Detector.from_export)
  ],
  extras_require={
    "test": ["pytest>=8,<10", "pytest-xdist>=3.6,<4"],
    "lint": ["ruff>=0.17,<0.18"],
    # ONNX exports: writing them (onnx) and running them (onnxruntime; a serving machine needs only this, numpy
    # and pillow: docs/install.md).
    "onnx": ["onnx>=1.20,<2", "onnxruntime>=1.24,<2"],
    # The PyTorch peer for benchmarks/peer_hf.py.
    "bench": ["torch==2.14.1", "transformers==5.23.0"],
  },
)
