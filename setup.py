"""Packaging: `pip install .` for the control plane, `pip install .[engine]` adds SGLang itself."""

from pathlib import Path

from setuptools import find_packages, setup


def _requirements() -> list[str]:
    lines = Path(__file__).with_name("requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="clearml-sglang",
    version="0.1.0",
    description="Deploy LLMs with SGLang behind an authenticated, observable ClearML endpoint",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["app", "app.*"]),
    package_data={"app.data": ["*.json"], "app.gateway": ["ui/*"],
                  "app.sglang": ["cpu_shim/*.py", "cpu_shim/*.md", "cpu_shim/sgl_kernel/*.py"]},
    install_requires=_requirements(),
    extras_require={
        # The engine: pinned to the release the argument table and reference notes describe.
        # accelerate and gguf: transformers' GGUF loader, which makes the demo's model (app.demo.smollm).
        "engine": ["sglang==0.5.23", "sglang-router==0.3.2", "accelerate>=1.0", "gguf>=0.10"],
        # playwright drives Debian's chromium for the page's browser tests (tests/browser); openai: what its SDK
        # makes of the endpoint's answers (tests/integration/test_client_errors.py)
        "test": ["pytest>=8", "hypothesis>=6.100", "ruff>=0.6", "pyhocon>=0.3.60", "playwright>=1.40", "openai>=1.0"],
    },
    entry_points={"console_scripts": ["clearml-sglang=app.cli:main"]},
)
