"""csrc/cuda/*.cu as C++ sources for the CPU emulation (cuda_emulation.h).

Every `kernel<<<grid, block, smem, stream>>>(args);` becomes a call of
clipfast_emulation::launch that runs the kernel as each thread of each block
with `smem` bytes of dynamic shared memory.
Used by setup.py (clipfast._cuda_emulated) and scripts/asan_emulated.sh:
    python csrc/emulate/rewrite_launches.py OUT_DIR   # prints the sources
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)<<<(.*?)>>>\((.*?)\);", re.S)


def _top_level_split(text):
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "(<[" and 1 or (ch in ")>]" and -1 or 0)
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    return parts + [current.strip()]


def emulated_cuda_sources(out_dir):
    """Write the rewritten sources to out_dir (only where they changed, so
    builds stay incremental) and return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = []
    for src in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        def launch(match):
            name, config, args = match.groups()
            config = _top_level_split(config)
            grid, block = config[:2]
            smem = config[2] if len(config) > 2 else "0"
            return (f"::clipfast_emulation::launch(dim3({grid}), dim3({block}), "
                    f"static_cast<size_t>({smem}), [&] {{ {name}({args}); }});")

        text = _LAUNCH.sub(launch, src.read_text())
        if "<<<" in text:
            raise RuntimeError(f"{src}: a kernel launch the emulation build cannot rewrite")
        target = out_dir / (src.stem + ".cpp")
        if not target.exists() or target.read_text() != text:
            target.write_text(text)
        sources.append(str(target))
    return sources


if __name__ == "__main__":
    print("\n".join(emulated_cuda_sources(sys.argv[1])))
