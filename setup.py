from setuptools import find_packages, setup

setup(
    name="palu_ds",
    version="0.1.0",
    description="DeepSpeed-based distributed trainer for LLM unlearning (PALU, constrained entropic unlearning, baselines)",
    # benchmarks/ is not installed (its scripts run from the checkout: python -m benchmarks.<name>); palu_eval/ still
    # is, because launch/train.py and palu_eval/run.py import it as a package
    packages=find_packages(include=["palu_ds", "palu_ds.*", "palu_eval", "palu_eval.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.14",
        "accelerate>=0.30",
        "transformers>=4.45",
        "gguf>=0.10",  # transformers' GGUF import (palu-ds import-model / fetch-model)
        "datasets>=2.18",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "tensorboard>=2.14",
        "tqdm",
        "pyyaml",
        "numpy",
        "scipy",
        "rouge-score",
        "matplotlib",
    ],
    extras_require={
        "mpi": ["mpi4py"],
        "lora": ["peft"],
        "wandb": ["wandb"],  # log.report_to: [wandb]
        "test": ["pytest", "pytest-timeout", "peft", "wandb"],
    },
    # python -m palu_ds.train / .finetune get their in-training evaluator from this plugin (palu_ds.run.plugin_evaluator)
    entry_points={"console_scripts": ["palu-ds=palu_ds.cli:main"],
                  "palu_ds.evaluators": ["default=palu_eval:trainer_evaluator"]},
)
