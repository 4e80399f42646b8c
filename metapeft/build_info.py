"""What this metapeft install was built with and what it can run: ``metapeft.build_info()`` and
``python -m metapeft.build_info [--json]``.

Reports which copy of metapeft it inspected (a source tree on ``sys.path`` shadows an installed copy: run from the
source root, it reports the source tree's extension, not the installed one), torch (version, its CUDA), the CUDA
devices (and whether the extension's archs cover them), the C++/CUDA extension ``metapeft._C`` (built or why not;
the torch, CUDA and arch list it was compiled for) and every backend of the ops with the reason it is unavailable.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import Distribution, PackageNotFoundError, distribution
from pathlib import Path
from urllib.parse import unquote, urlparse

import torch

from metapeft.ops.backends import available_backends
from metapeft.ops.cuda_backend import EXTENSION_ERROR


def _extension() -> dict:
    if EXTENSION_ERROR is not None:
        return {"built": False, "reason": EXTENSION_ERROR}
    from metapeft import _C

    return {
        "built": True,
        "path": _C.__file__,
        "torch": _C.build_torch_version,
        "cuda": _C.build_cuda_version,
        "arch_list": _C.build_arch_list.split(","),
    }


def arch_runs_on(arch: str, capability: tuple[int, int]) -> bool:
    """Whether code built for ``arch`` ("9.0", "8.0+PTX") runs on a device of ``capability`` (major, minor):
    a cubin runs on its own major version at an equal or higher minor, PTX on any later device."""
    ptx = arch.endswith("+PTX")
    built = tuple(int(part) for part in arch.removesuffix("+PTX").split("."))
    return built <= capability and (ptx or built[0] == capability[0])


def _devices(arch_list: list[str] | None) -> list[dict]:
    if not torch.cuda.is_available():
        return []
    devices = []
    for index in range(torch.cuda.device_count()):
        capability = torch.cuda.get_device_capability(index)
        device = {"index": index, "name": torch.cuda.get_device_name(index), "capability": "{}.{}".format(*capability)}
        if arch_list is not None:
            device["extension_runs"] = any(arch_runs_on(arch, capability) for arch in arch_list)
        devices.append(device)
    return devices


def _installed_copy(dist: Distribution | None) -> tuple[Path | None, bool]:
    """Where the installed distribution keeps the package (the source tree of an editable install), and whether it
    is editable; ``(None, False)`` when metapeft is not installed."""
    if dist is None:
        return None, False
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct.get("dir_info", {}).get("editable"):
        return Path(unquote(urlparse(direct["url"]).path)).resolve() / "metapeft", True
    return Path(str(dist.locate_file("metapeft"))).resolve(), False


def package_origin(imported: Path | None = None, dist: Distribution | None = None) -> dict:
    """Which copy of metapeft was inspected: ``path`` (the imported package, default this one), ``installed`` (the
    installed distribution's package, None when not installed), ``editable`` and ``shadowed`` (True when the
    imported copy is not the installed one: a source tree earlier on ``sys.path``, e.g. the current directory)."""
    imported = (imported or Path(__file__).parent).resolve()
    if dist is None:
        try:
            dist = distribution("metapeft")
        except PackageNotFoundError:
            dist = None
    installed, editable = _installed_copy(dist)
    return {"path": str(imported), "installed": None if installed is None else str(installed), "editable": editable,
            "shadowed": installed is not None and installed != imported}


def format_origin(origin: dict) -> str:
    """The report's line saying which copy was inspected and why."""
    line = f"metapeft: inspected the copy at {origin['path']}"
    if origin["shadowed"]:
        return (f"{line}, which shadows the installed copy at {origin['installed']} (it comes first on sys.path, e.g. "
                "as the current directory); run from another directory to inspect the installed copy")
    if origin["installed"] is None:
        return f"{line} (not installed: found on sys.path)"
    return f"{line} ({'an editable install of this source tree' if origin['editable'] else 'the installed copy'})"


def build_info() -> dict:
    """A JSON-ready dict: ``package`` (:func:`package_origin`), ``torch``, ``torch_cuda``, ``cuda_available``,
    ``devices`` (list of dicts), ``extension`` (``built``; ``path``, ``torch``, ``cuda``, ``arch_list`` or
    ``reason``) and ``backends`` (name -> ``None`` when usable here, else the reason it is not)."""
    extension = _extension()
    return {
        "package": package_origin(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": _devices(extension.get("arch_list")),
        "extension": extension,
        "backends": available_backends(),
    }


def package_versions(names: tuple[str, ...] = ("torch", "triton", "timm", "torchvision", "safetensors")
                     ) -> dict[str, str]:
    """Installed version of each distribution in ``names`` (``"not installed"`` when absent)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def format_build_info(info: dict) -> str:
    """``build_info()`` as the human-readable report ``python -m metapeft.build_info`` prints."""
    ext = info["extension"]
    lines = [format_origin(info["package"]), f"torch {info['torch']} (CUDA {info['torch_cuda'] or 'none'})"]
    if not info["devices"]:
        lines.append("devices: none (CUDA is not available)")
    for device in info["devices"]:
        runs = {True: ", extension runs here", False: ", NOT covered by the extension's archs", None: ""}
        lines.append(f"device cuda:{device['index']}: {device['name']} (sm {device['capability']}"
                     f"{runs[device.get('extension_runs')]})")
    if ext["built"]:
        lines.append(f"extension metapeft._C: built for torch {ext['torch']}, CUDA {ext['cuda']}, "
                     f"archs {';'.join(ext['arch_list'])} ({ext['path']})")
    else:
        where = f" (in the inspected copy at {info['package']['path']})" if info["package"]["shadowed"] else ""
        lines.append(f"extension metapeft._C: {ext['reason']}{where}")
    lines.append("backends:")
    lines += [f"  {name:<7} {'available' if reason is None else 'unavailable: ' + reason}"
              for name, reason in info["backends"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the report (or ``--json``); returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m metapeft.build_info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print build_info() as JSON")
    args = parser.parse_args(argv)
    info = build_info()
    print(json.dumps(info, indent=2) if args.json else format_build_info(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
