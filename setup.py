from setuptools import find_packages, setup

setup(
    name="diffusers-pd",
    version="0.1.0",
    description="Progressive Distillation and SFD for Hugging Face diffusers: sample in 4, 2 or 1 steps.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    package_dir={"": "src"},
    packages=find_packages("src"),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "diffusers>=0.30",
        "transformers>=4.40",
        "accelerate>=0.30",
        "datasets>=2.18",
        "safetensors>=0.4",
        "huggingface-hub>=0.23",
        "numpy",
        "Pillow",
        "tqdm",
        "scikit-learn>=1.3",  # the offline `digits` data set
    ],
    extras_require={
        "test": ["pytest>=7", "scikit-learn>=1.3", "tensorboard", "matplotlib>=3.7", "torchmetrics>=1.3", "scipy", "peft>=0.10"],
        "eval": ["torchmetrics>=1.3", "matplotlib>=3.7", "scipy"],
        "lora": ["peft>=0.10"],
    },
    license="Apache-2.0",
)
