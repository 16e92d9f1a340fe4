"""samba_jax: Samba (Mamba + sliding-window attention) pretraining in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="samba_jax",
    version="0.1.0",
    description="Samba (Mamba + sliding-window attention) language-model pretraining in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=find_packages(include=["samba_jax", "samba_jax.*", "pallas_kernels", "pallas_kernels.*"]),
    install_requires=[
        # One jax version on CPU and on the H200 image (jax 0.11.2, CUDA 13).
        "jax==0.11.2",
        "flax==0.12.10",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.4",
        "grain==0.2.18",
        "array-record>=0.8.1",
        "ml-collections>=1.1.0",
        "sentencepiece>=0.2.0",
        "tensorboardX>=2.6",
        "absl-py>=2.1",
        "numpy>=1.26",
        "tqdm>=4.66",
        "safetensors>=0.4",
    ],
    extras_require={
        # The test extra pulls the optional readers so CI exercises them (TensorFlow is never needed).
        # pytest-xdist runs the suite on every core (pytest.ini); ruff is the linter .ci/run calls (ruff.toml).
        "test": ["pytest>=8", "pytest-xdist>=3.6", "filelock>=3.12", "ruff==0.17.6", "pyarrow>=15",
                 "tensorflow-datasets>=4.9.10"],
        "tfds": ["tensorflow-datasets>=4.9.10"],
        # Plots of the evaluation results (python -m samba_jax.evaluate; without it no PNG is written).
        "eval": ["matplotlib>=3.8"],
        "parquet": ["pyarrow>=15"],
        "gpu": ["jax[cuda13]==0.11.2"],
        "tpu": ["jax[tpu]==0.11.2"],
        # Logit-parity tests against transformers (tests/test_hf_convert.py skip without them).
        "interop": ["torch>=2.4", "transformers>=4.46"],
        # Upstream Triton's compiler and ptxas for benchmarks/kernel_sass_counts.py (no GPU needed).
        "sass": ["triton==3.5.1"],
    },
)
