"""What a built engine holds: its header (who built it, for which GPUs) and its layers.

Running, deserializing or inspecting an engine needs a GPU (`polygraphy inspect model x.engine`
fails with cudaError 35 without one; polygraphy uses tensorrt_rtx only with
POLYGRAPHY_USE_TENSORRT_RTX=1), and EngineInspector needs a deserialized engine, so the layer list
comes from the builder's verbose "Layers:" message and the header is read byte-wise: tensorrt_rtx
engines start with b"vtrt", bytes 24..27 are its version and byte 32 a bit set of the targets
(observed, not documented; docs/TENSORRT.md).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from trtbuild.backends.tensorrt.probe import RTX_MAGIC, can_run_tensorrt, is_rtx, tensorrt_available
from trtbuild.errors import TrtbuildError

# Observed bit of each target in byte 32 of a tensorrt_rtx engine header.
_RTX_TARGET_BITS = {1: "SM75", 2: "SM80", 4: "SM86", 8: "SM89", 16: "SM120", 32: "SM121"}


def engine_header_info(engine_path: str | os.PathLike) -> dict[str, Any]:
    """What built a serialized engine, read from its first 64 bytes (no GPU needed).

    For tensorrt_rtx engines (b"vtrt"): version from bytes 24..27 and targets from the bit set at
    byte 32. This layout was observed with tensorrt_rtx 1.7.1.116, not documented; unknown bits are
    reported as "bit<N>".
    """
    with open(engine_path, "rb") as f:
        head = f.read(64)
    if not head.startswith(RTX_MAGIC):
        return {"magic": head[:4].decode("latin-1"), "package": None}
    version = ".".join(str(b) for b in head[24:28])
    bits = head[32] if len(head) > 32 else 0
    targets = [n for b, n in _RTX_TARGET_BITS.items() if bits & b]
    targets += [f"bit{i}" for i in range(8) if bits & (1 << i) and (1 << i) not in _RTX_TARGET_BITS]
    return {"magic": "vtrt", "package": "tensorrt_rtx", "version": version, "compute_capabilities": targets}


_LAYER_RE = re.compile(r"Name: (?P<name>.*?), LayerType: (?P<type>[^,]*),.*?Metadata: (?P<meta>.*)$")


def parse_engine_layers(text: str | None) -> list[dict[str, Any]] | None:
    """The builder's verbose "Layers:" message -> [{name, type, onnx_nodes}], or None without one."""
    if not text:
        return None
    layers = []
    for line in text.splitlines()[1:]:
        m = _LAYER_RE.search(line)
        if m:
            layers.append({"name": m["name"], "type": m["type"],
                           "onnx_nodes": re.findall(r"\[ONNX Layer: ([^\]]*)\]", m["meta"])})
    return layers


def parse_memory(lines: list[str]) -> dict[str, int]:
    """The builder's memory figures (activation, weights, scratch, persistent) in bytes."""
    keys = {"Total Activation Memory": "activation_bytes", "Total Weights Memory": "weights_bytes",
            "Max Scratch Memory": "max_scratch_bytes", "Total Host Persistent Memory": "host_persistent_bytes",
            "Total Device Persistent Memory": "device_persistent_bytes"}
    out = {}
    for line in lines:
        for k, v in keys.items():
            m = re.search(re.escape(k) + r": (\d+) bytes", line)
            if m:
                out[v] = int(m.group(1))
    return out


def polygraphy_exe() -> list[str]:
    """The polygraphy command beside this Python (a venv's), else on PATH."""
    exe = Path(sys.executable).parent / "polygraphy"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("polygraphy")
    if found:
        return [found]
    raise TrtbuildError("polygraphy is not installed: pip install polygraphy")


def polygraphy_env(rtx: bool) -> dict[str, str]:
    """polygraphy's environment: no auto-installs; tensorrt_rtx only when asked (rtx)."""
    env = dict(os.environ)
    env.setdefault("POLYGRAPHY_AUTOINSTALL_DEPS", "0")
    if rtx:
        env["POLYGRAPHY_USE_TENSORRT_RTX"] = "1"
    return env


def polygraphy_inspect_engine(engine_path: str | os.PathLike, timeout: float = 300) -> str:
    """`polygraphy inspect model ENGINE --show layers`; without a GPU, says so with polygraphy's words.

    Observed here (no GPU): polygraphy deserializes the engine and fails with
    "[!] Could not deserialize engine. See log for details." after
    "IRuntime::deserializeCudaEngine: Error Code 1: Cuda Runtime (... cudaError 35: CUDA driver
    version is insufficient for CUDA runtime version)".
    """
    trt, package = tensorrt_available()
    cmd = polygraphy_exe() + ["inspect", "model", str(engine_path), "--model-type", "engine", "--show", "layers"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env=polygraphy_env(is_rtx(package) if trt is not None else False))
    except subprocess.TimeoutExpired:
        return f"polygraphy inspect timed out after {timeout:.0f} s"
    text = (r.stdout + r.stderr).strip()
    if r.returncode == 0:
        return text
    said = [ln.strip() for ln in text.splitlines() if ln.lstrip().startswith(("[!]", "[E]"))]
    gpu_ok, why = can_run_tensorrt()
    reason = ("inspecting a TensorRT engine deserializes it, which needs an NVIDIA GPU: " + why) if not gpu_ok \
        else "polygraphy could not inspect the engine"
    return f"{reason}. polygraphy said: " + " | ".join(said or text.splitlines()[-3:])


def layers_report(engine_path: str | os.PathLike, info: dict[str, Any] | None = None) -> str:
    """For the verbose build log: `polygraphy inspect model ENGINE --show layers`, and the builder's own
    list of the engine's layers (what polygraphy would show; inspecting an engine needs a GPU)."""
    lines = [f"polygraphy inspect model {Path(engine_path).name} --show layers:"]
    try:
        lines += ["  " + ln for ln in polygraphy_inspect_engine(engine_path).splitlines()]
    except TrtbuildError as e:  # polygraphy not installed
        lines.append(f"  {e}")
    layers = (info or {}).get("engine_layers")
    if layers:
        lines.append(f"engine layers from the TensorRT builder ({len(layers)}):")
        for i, layer in enumerate(layers):
            nodes = ", ".join(layer["onnx_nodes"][:4]) + (" ..." if len(layer["onnx_nodes"]) > 4 else "")
            lines.append(f"  [{i}] {layer['type']:<16} {layer['name'][:100]}" + (f"  <- {nodes}" if nodes else ""))
    return "\n".join(lines)
