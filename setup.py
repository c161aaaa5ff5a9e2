"""sparse-detr-jax: JAX/Flax reference implementation of Sparse DETR (Roh et al., ICLR 2022)."""
from setuptools import find_packages, setup

setup(
    name="sparse-detr-jax",
    version="0.1.0",
    description="Sparse DETR (learnable encoder-token sparsity) in JAX/Flax, with official-checkpoint parity",
    packages=find_packages(include=["sparse_detr_jax", "sparse_detr_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10,<0.11",
        "jaxlib>=0.10,<0.11",
        "flax>=0.12,<0.13",
        "optax",
        "orbax-checkpoint>=0.12,<0.13",
        "numpy",
        "scipy",
        "pycocotools",
        "ml_collections",
        "absl-py",
        "pillow",
        "grain",
        "tensorflow-datasets",
        "array_record",
        "importlib_resources",
        "tensorboardX",  # tensorflow-datasets imports it without declaring it
    ],
    extras_require={
        # CPU build of PyTorch, only to read official .pth checkpoints.
        "convert": ["torch==2.13.0"],
        "test": ["pytest", "torch==2.13.0"],
        # The PyTorch peer for benchmarks/peer_hf.py.
        "bench": ["torch==2.13.0", "transformers==5.23.0"],
    },
)
