"""Run by ComfyUI-Manager after cloning (cwd = the pack root, sys.executable = ComfyUI's Python).

Idempotent and offline-friendly: installs requirements.txt only when something in it is missing. Never installs or
upgrades torch; does no GPU work.
"""
from __future__ import annotations
import importlib.util
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def missing_requirements():
    missing = []
    with open(os.path.join(HERE, "requirements.txt")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name = line.split(">")[0].split("=")[0].split("<")[0].strip()
            if name.lower() in ("torch", "torchvision", "torchaudio"):
                continue
            if importlib.util.find_spec(name.replace("-", "_")) is None:
                missing.append(line)
    return missing


if __name__ == "__main__":
    todo = missing_requirements()
    if todo:
        sys.exit(subprocess.call([sys.executable, "-m", "pip", "install", *todo]))
