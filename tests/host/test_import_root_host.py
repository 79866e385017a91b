"""How the host itself loads the pack: ComfyUI's own loader (``nodes.load_custom_node``, what the server runs at start)
names a custom-node folder after its path, so the pack runs there under one path-derived root, each file once.
Tests import it as ``fewstep`` instead (tools/packroot.py) and never call that loader in-process, where it would make
a second copy of every module; this runs the host's loader in a fresh process, as the server does."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tools import hostenv, packroot

pytestmark = pytest.mark.host

PROBE = r"""
import asyncio, json, sys
sys.path.insert(0, {host!r})
import comfy.options
comfy.options.enable_args_parsing(False)
from comfy.cli_args import args
args.cpu = True
import nodes
sys.path.insert(0, {repo!r})
from tools import packroot
before = {{str(p) for p in packroot.checkout_files_loaded()}}
ok = asyncio.run(nodes.load_custom_node({pack!r}))
loaded = {{str(p.relative_to(packroot.REPO)): sorted(m) for p, m in packroot.checkout_files_loaded().items()
          if str(p) not in before}}
print(json.dumps({{"ok": ok, "loaded": loaded, "fewstep_nodes": sorted(k for k in nodes.NODE_CLASS_MAPPINGS
                                                                   if k.startswith("FewStep")),
                  "fewstep_in_sys_modules": "fewstep" in sys.modules}}))
"""


def test_host_loader_loads_each_pack_file_once_under_one_root(host):
    pack_dir = hostenv.host_dir() / "custom_nodes" / "fewstep"
    code = PROBE.format(host=str(hostenv.host_dir()), repo=str(packroot.REPO), pack=str(pack_dir))
    out = subprocess.run([sys.executable, "-c", code], cwd=hostenv.host_dir(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["ok"] and len(res["fewstep_nodes"]) >= 10, res
    loaded = res["loaded"]
    assert "__init__.py" in loaded and "nodes/__init__.py" in loaded and "samplers/schedules.py" in loaded, loaded
    root = loaded["__init__.py"][0]
    assert root.endswith("fewstep") and root == str(pack_dir).replace(".", "_x_"), root  # the host's path-derived name
    for rel, names in loaded.items():
        assert len(names) == 1, f"{rel} loaded by the host under {names}"
        assert names[0] == root or names[0].startswith(root + "."), (rel, names)
    # The pack's own code never imports itself by the `fewstep` name (only relative imports), so the host's load
    # brings in no second root of its own.
    assert not res["fewstep_in_sys_modules"]
