import os
import runpy

from setuptools import find_packages, setup

REMOTE_CODE = [
    "configuration_emovlm_kd",
    "modeling_emovlm_kd",
    "image_processing_emovlm_kd",
    "image_decoding_emovlm_kd",
    "processing_emovlm_kd",
    "pipeline_emovlm_kd",
    "vlm_adapters_emovlm_kd",
]

# Version ranges are declared once, in emovlm_kd/dependencies.py (run, not imported: nothing is installed yet).
DEPENDENCIES = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "emovlm_kd", "dependencies.py"))


def requirements(group: dict) -> list[str]:
    return [f"{name}{versions}" for name, versions in group.items()]


core = requirements(DEPENDENCIES["CORE"])
train = requirements(DEPENDENCIES["TRAIN"])
qlora = requirements(DEPENDENCIES["QLORA"])
demo = requirements(DEPENDENCIES["DEMO"])
docs = requirements(DEPENDENCIES["DOCS"])
tests = requirements(DEPENDENCIES["TESTS"]) + train + demo + docs  # the docs test builds the site

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
            "emovlm-kd-convert-reference = emovlm_kd.cli:convert_reference_command",
        ]
    },
)
