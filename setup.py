from setuptools import find_packages, setup

REMOTE_CODE = ["configuration_emovlm_kd", "modeling_emovlm_kd", "image_processing_emovlm_kd", "pipeline_emovlm_kd"]

core = [
    "torch>=2.4",
    "torchvision",
    "transformers>=5.24,<6",
    "huggingface_hub>=1.0",
    "safetensors",
    "tokenizers",
    "pillow",
    "numpy",
]
train = [
    "accelerate>=1.10",
    "peft>=0.17",
    "datasets>=4.0",
    "timm>=1.0",
    "scikit-learn",
    "tensorboard",
    "matplotlib",
    "pyyaml",
    "tqdm",
]
qlora = ["bitsandbytes"]
demo = ["gradio>=5"]
docs = ["mkdocs-material", "mkdocstrings[python]"]
tests = ["pytest", "selenium", "evaluate"] + train + demo + docs  # the docs test builds the site

setup(
    name="emovlm-kd",
    version="0.1.0",
    description="EmoVLM-KD visual emotion analysis: a frozen VLM, a head distilled onto its own encoder, and a gate",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    py_modules=REMOTE_CODE,
    packages=find_packages(include=["emovlm_kd", "emovlm_kd.*"]),
    # Files the export stage copies into every model repo (Endpoint handler, Space app), and the shipped recipes.
    package_data={"emovlm_kd": ["repo_template/*", "repo_template/space/*", "recipes/*.yaml"]},
    install_requires=core,
    extras_require={"train": train, "qlora": qlora, "demo": demo, "tests": tests, "docs": docs, "all": tests},
    entry_points={
        "console_scripts": [
            "emovlm-kd-train = emovlm_kd.cli:train_command",
            "emovlm-kd-instruction-data = emovlm_kd.cli:instruction_data_command",
            "emovlm-kd-instruction-tuning = emovlm_kd.cli:instruction_tuning_command",
            "emovlm-kd-teacher = emovlm_kd.cli:teacher_command",
            "emovlm-kd-distill = emovlm_kd.cli:distill_command",
            "emovlm-kd-gate = emovlm_kd.cli:gate_command",
            "emovlm-kd-evaluate = emovlm_kd.cli:evaluate_command",
            "emovlm-kd-export = emovlm_kd.cli:export_command",
            "emovlm-kd-predict = emovlm_kd.cli:predict_command",
            "emovlm-kd-demo = emovlm_kd.cli:demo_command",
        ]
    },
)
