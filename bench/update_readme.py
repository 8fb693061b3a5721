"""Copy the latest benchmark tables from bench/results/*.md into README.md between named markers.

    python bench/update_readme.py

A README section `<!-- NAME -->` ... `<!-- /NAME -->` receives bench/results/<file>.md (without its title)
for each pair in SECTIONS, so the figures in the README are always the ones last measured.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {
    "core-bench-cpu": "core_bench.md",
    "core-bench-gpu": "core_bench_cuda.md",
    "finance-bench": "finance_bench.md",
    "medical-bench": "medical_bench.md",
    "education-bench": "education_bench.md",
    "education-recommend-bench": "education_recommend_bench.md",
    "suite-bench": "suite_bench.md",
    "suite-bench-pooled": "suite_bench_pooled.md",
    "compress-bench": "compress_bench.md",
}


def _demote(line: str) -> str:
    """Headings inside a README benchmark block sit below its `###` title: `##`/`###` become `####`."""
    match = re.match(r"^(#{2,3}) ", line)
    return "#### " + line[match.end() :] if match else line


def main() -> None:
    readme_path = ROOT / "README.md"
    readme = readme_path.read_text()
    for marker, filename in SECTIONS.items():
        result = ROOT / "bench" / "results" / filename
        if f"<!-- {marker} -->" not in readme or not result.is_file():
            continue
        body = "\n".join(
            _demote(line) for line in result.read_text().splitlines() if not line.startswith("# ")
        ).strip()
        block = f"<!-- {marker} -->\n{body}\n<!-- /{marker} -->"
        if f"<!-- /{marker} -->" in readme:
            readme = re.sub(
                rf"<!-- {marker} -->.*?<!-- /{marker} -->", lambda _, block=block: block, readme, flags=re.S
            )
        else:
            readme = readme.replace(f"<!-- {marker} -->", block)
    readme_path.write_text(readme)


if __name__ == "__main__":
    main()
