"""The docs: every generated region is what `python -m slowrun.docgen` makes of the config and the committed
results (and the check does catch a region that differs), and every relative link points to a file."""

import json
import re
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest

from slowrun import docgen
from slowrun.config import SECTIONS

ROOT = Path(__file__).resolve().parents[1]


def committed_ledger(tmp_path) -> Path | None:
    """The ledger as HEAD has it, when the working tree's differs (a running benchmark appends to it
    between the commits that regenerate the docs with it); None otherwise, or without git."""
    try:
        r = subprocess.run(["git", "show", f"HEAD:{docgen.LEDGER}"], cwd=ROOT, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0 or r.stdout == (ROOT / docgen.LEDGER).read_bytes():
        return None
    (tmp_path / "ledger.jsonl").write_bytes(r.stdout)
    return tmp_path / "ledger.jsonl"


def test_the_docs_are_what_docgen_generates(tmp_path):
    names = {name for path in docgen.doc_paths(ROOT) for name, _, _ in docgen.regions(path.read_text(), str(path))}
    assert {"config", "techniques", "ledger-runs nanochat", "ledger-curve nanochat", "ledger-runs nanochat_ref",
            "ablation benchmarks/results/ablation_cpu.json"} <= names, names
    problems = docgen.check(ROOT)
    if problems and (head := committed_ledger(tmp_path)) is not None:
        problems = docgen.check(ROOT, ledger=head)  # the docs as committed with the ledger as committed
    assert not problems, "\n".join(problems) + "\n(run `python -m slowrun.docgen` in the repository root)"


def test_a_changed_cell_in_a_committed_doc_is_named(tmp_path):
    doc = (ROOT / "docs" / "cpu-track.md").read_text()
    start = doc.index("<!-- generated: ablation benchmarks/results/ablation_cpu.json ")
    cell = "| 5.0401 +- 0.0042 |"  # the document shuffle left out
    i = doc.index(cell, start)
    assert i < doc.index(docgen.END, start)
    copy = tmp_path / "cpu-track.md"
    copy.write_text(doc[:i] + "| 5.0301 +- 0.0042 |" + doc[i + len(cell):])
    problems = docgen.check(ROOT, docs=[copy])  # the ledger's regions may differ: it grows between commits
    assert [p for p in problems if "'ledger-" not in p] == [
        f"{copy}: region 'ablation benchmarks/results/ablation_cpu.json' differs from what `python -m slowrun.docgen` generates"]


def fake_ablation(test_losses: list[float]) -> dict:
    def rec(name, tests, **kw):
        return {"technique": name, "off": kw.pop("off", {}), "seeds": len(tests), "test_losses": tests,
                "test_mean": sum(tests) / len(tests), "test_std": 0.01, "val_mean": 5.1, "val_std": 0.02,
                "wall_s": 60.0, "efficiency": None, **kw}

    return {"format": "slowrun-ablation/1", "recipe": "smoke", "fixed": {"train.epochs": 2}, "seeds": 2,
            "curve": None, "runs": 4, "finished": 4, "full": rec("full", [5.0, 5.2]),
            "variants": [rec("unet", test_losses, off={"model.unet": False}, what="no U-Net skips",
                             delta_test=0.1, p_hurts=0.2)]}


def test_write_fills_a_region_and_check_catches_a_changed_doc_or_results_file(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "ab.json").write_text(json.dumps(fake_ablation([5.1, 5.3])))
    doc = tmp_path / "docs" / "notes.md"
    marker = "<!-- generated: ablation results/ab.json (python -m slowrun.docgen) -->"
    doc.write_text(f"# Notes\n\nHand-written.\n\n{marker}\nstale\n{docgen.END}\n\nMore prose.\n")
    assert docgen.check(tmp_path) == ["docs/notes.md: region 'ablation results/ab.json' differs from what "
                                      "`python -m slowrun.docgen` generates"]
    assert docgen.main(["--root", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "docs/notes.md: regenerated 'ablation results/ab.json'\n"
    text = doc.read_text()
    assert text.startswith(f"# Notes\n\nHand-written.\n\n{marker}\n\nThe `smoke` recipe with train.epochs=2; 2 seeds each.\n")
    assert "| unet: no U-Net skips | model.unet=False | 2 | 5.1000, 5.3000 | 5.2000 +- 0.0100 | +0.1000 | 0.200 |" in text
    assert text.endswith(f"|\n\n{docgen.END}\n\nMore prose.\n")
    assert docgen.check(tmp_path) == [] and docgen.main(["--check", "--root", str(tmp_path)]) == 0
    assert docgen.main(["--root", str(tmp_path)]) == 0 and doc.read_text() == text  # nothing left to do

    doc.write_text(text.replace("5.1000, 5.3000", "5.1000, 5.3001"))  # a cell edited by hand
    assert docgen.main(["--check", "--root", str(tmp_path)]) == 1
    assert "docs/notes.md: region 'ablation results/ab.json' differs" in capsys.readouterr().err
    doc.write_text(text)
    (tmp_path / "results" / "ab.json").write_text(json.dumps(fake_ablation([5.1, 5.4])))  # new results
    assert len(docgen.check(tmp_path)) == 1


def test_a_region_without_its_end_or_of_an_unknown_kind_is_an_error_naming_its_line(tmp_path):
    start = "<!-- generated: {} (python -m slowrun.docgen) -->"
    for text, says in [(f"a\n{start.format('config')}\nb\n", "x.md:2: region 'config' has no `<!-- end generated -->`"),
                       (f"{start.format('config')}\n{start.format('config')}\n{docgen.END}\n", "x.md:1: region 'config'"),
                       (f"{start.format('plots')}\n{docgen.END}\n", "x.md:1: region 'plots': unknown"),
                       (f"\n{start.format('ablation none.json')}\n{docgen.END}\n", "x.md:2: region 'ablation none.json': no such file"),
                       (f"{start.format('ledger-runs nonesuch')}\n{docgen.END}\n", "x.md:1: region 'ledger-runs nonesuch': no run")]:
        with pytest.raises(docgen.DocgenError, match=re.escape(says)):
            docgen.render(text, ROOT, "x.md")


def test_the_config_reference_has_every_key_with_its_help():
    text = docgen.generate("config", ROOT)
    for section, cls in SECTIONS.items():
        assert f"### `{section}`" in text
        for f in fields(cls):
            assert f"| `{section}.{f.name}` | " in text
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == sum(len(fields(cls)) for cls in SECTIONS.values())
    assert "| `model.norm` | `\"rmsnorm\"` | normalization: " in text
    assert r"KL(teacher/T \|\| student/T)" in text  # a pipe in a help text does not split its cell


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def test_every_relative_link_in_the_docs_points_to_a_file():
    broken = []
    for path in docgen.doc_paths(ROOT):
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # code blocks
        text = re.sub(r"`[^`\n]*`", "", text)  # inline code
        links = LINK.findall(text)
        for target in links:
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL or an anchor in the same page
            if not (path.parent / target.split("#")[0]).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, "links to no file:\n" + "\n".join(broken)
    assert LINK.findall("see [the data](docs/data.md) and ![a plot](../p.png \"title\")") == ["docs/data.md", "../p.png"]


def test_the_readmes_module_map_is_the_layers_the_layer_test_enforces():
    """README.md's "Modules by layer" table names, layer by layer, the modules of
    tests/test_layers.py's LAYERS (the map the import check uses), in the same order."""
    from tests.test_layers import LAYERS

    text = Path("README.md").read_text()
    table = text[text.index("| layer | modules |"):].split("\n\n")[0].splitlines()[2:]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table]
    readme = [{m.strip(" `") for m in mods.split(",")} for _, mods in rows]
    assert len(rows) == len(LAYERS)
    for (name, mods), (layer, got) in zip(LAYERS, zip([r[0] for r in rows], readme)):
        assert got == mods - {"__init__", "__main__"}, (name, layer, sorted(got ^ (mods - {"__init__", "__main__"})))
