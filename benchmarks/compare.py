"""Concept methods side by side with the group-robust methods, one table (issue 16).

    python benchmarks/compare.py --families color_mnist texture_mnist decoy_mnist marker_mnist faces \\
        --methods erm group_balanced reweight group_dro jtt dfr dfr_matched lff cd rrclarc \\
        --seeds 1 2 3 --runs logs/compare --out benchmarks/results/compare_runs.jsonl [--budget-min 600]
    python benchmarks/compare.py --table benchmarks/results/compare_runs.jsonl

A cell is (family, method, seed), run in ``<runs>/<family>/<method>_seed<N>``:

* a group method: ``train.py experiment=<family>/baseline method=<m> seed=<N>`` (the baseline's
  epochs for every method: one training budget);
* ``dfr_matched``: DFR with ``model.dfr.heldout_size`` set to the number of concept images the
  default recipe uses on that family (:func:`concept_image_count`);
* a concept method: ``pipeline.py experiment=<family>/<recipe> pipeline.seeds=[N]`` fine-tuning
  the ERM cell's model of the same family and seed (``pipeline.base_ckpt``), so ERM is trained
  once per (family, seed) and is every concept method's "before".

Every cell is tested under two model-selection rules: ``strict`` (best ``val/acc``, the biased
validation split) and ``worst`` (best worst-group accuracy over the validation splits pooled,
``val_all/acc_worst_group``). Per rule a row holds test accuracy, bias-conflicting and
worst-group test accuracy (%), and the accuracy on the test split whose cue is independent of
the label (the datamodule's ``random_cue_split``; ``data.random_cue_split`` of a folder dataset);
the table adds the gap closed ``(m - ERM) / (oracle - ERM)`` against the oracle of
:mod:`generality` (``data.unbiased=true``; its strict figure) where that gap exceeds ``MIN_GAP``.
A folder family ``folder:<root>`` takes its ``data=folder`` settings from ``<root>/data.yaml``
where it exists (``num_classes: 4`` -> ``data.num_classes=4``, e.g. ``random_cue_split: test``),
and its oracle is the same baseline on ``<root>_unbiased``, the folder's copy with the training
cue independent of the label (``python -m datamodules.shapes_folder <root> --twin`` writes both);
without that copy the family has no oracle and the table says so. A cell whose run directory
holds its results is read, not rerun. A cell that fails is recorded ``failed: <reason>``, one
that does not fit ``--budget-min`` (minutes for the whole command) ``not run: budget``; the
table prints both. Hydra overrides after ``--`` apply
to every cell and the oracle (e.g. ``-- trainer.max_epochs=1`` for a smoke run, or
``data.conflicting_fraction=0.05``; give such variants their own ``--runs``).
``--read-only`` runs nothing: it writes the rows of the finished cells (and lists the others as
not run), e.g. to publish while runs go on. ``--table`` writes ``compare.md`` and ``compare.png`` (methods x families heat map) beside the JSONL.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's cdistill, not an installed one
sys.path.insert(0, str(ROOT / "benchmarks"))

from generality import MIN_GAP, oracle  # noqa: E402

from cdistill.concepts.sets import expand_templates  # noqa: E402
from cdistill.robust.supervision import METHOD_SUPERVISION  # noqa: E402
from cdistill.utils.formatting import MISSING, mean_std  # noqa: E402
from datamodules.shapes_folder import DATA_SETTINGS, unbiased_twin  # noqa: E402

#: Selection rule -> the validation metric it maximises (added to every run as ``protocols.<rule>``).
RULES = {"strict": "val/acc", "worst": "val_all/acc_worst_group"}
GROUP_METHODS = ("erm", "class_balanced", "group_balanced", "reweight", "group_dro", "jtt", "dfr", "lff")
#: DFR with its held-out budget matched to the default recipe's concept images.
MATCHED = "dfr_matched"
#: Concept method -> (experiment under <family>/, extra overrides; "{gray}" is "_gray" on 1-channel data).
CONCEPT_METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    "cd": ("cd", ()),
    "cd_best": ("cd_best", ()),
    "leace": ("leace", ()),
    "rlace": ("rlace", ()),
    "rrclarc": ("cd", ("model=rrclarc{gray}",)),
}
ALL_METHODS = (*GROUP_METHODS, MATCHED, *CONCEPT_METHODS)
#: The recipe whose concept images DFR's matched held-out set counts.
DEFAULT_RECIPE = "cd"
GRAY_FAMILIES = ("decoy_mnist", "marker_mnist")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
CELL_FILE = "compare_cell.json"  # the wall time of a finished cell, beside its results
METRICS = (("acc", "test accuracy"), ("acc_conflicting", "bias-conflicting test accuracy"),
           ("acc_worst_group", "worst-group test accuracy"),
           ("acc_random", "random-cue test accuracy (the cue drawn independently of the label)"))
#: Column names of :data:`METRICS` in the recipe-vs-DFR table.
SHORT = (("acc", "acc"), ("acc_conflicting", "conflicting"), ("acc_worst_group", "worst group"), ("acc_random", "random cue"))
#: The oracle status of a folder family without an unbiased copy of its data.
NO_ORACLE = "no oracle (no unbiased twin of the folder data)"
#: A cell's timings and their section titles in the report.
TIMES = (("wall_s", "Wall time per cell (s; a concept method's is its fine-tune alone: add the ERM row for its whole cost)"),
         ("cpu_s", "CPU time per cell (s, user + system of all threads; does not grow with the machine's load)"))


@dataclass(frozen=True)
class Family:
    """A bias family: its label in the table, its experiment folder under ``conf/experiment/``,
    the run folder, the overrides every run of it needs (``data.root`` of a folder dataset and
    its settings), and those of its oracle run (None: it has no oracle)."""

    label: str
    key: str
    folder: str
    overrides: tuple[str, ...] = ()
    concept_overrides: tuple[str, ...] = field(default=())
    oracle: tuple[str, ...] | None = ("data.unbiased=true",)


def _hydra_value(value: Any) -> str:
    """A YAML scalar or list as a Hydra override value (``None`` -> ``null``, ``True`` -> ``true``)."""
    return json.dumps(value) if isinstance(value, (bool, list)) or value is None else str(value)


def folder_settings(root: Path) -> tuple[str, ...]:
    """``data.<key>=<value>`` of each entry of ``<root>/data.yaml`` (none where it is missing)."""
    path = root / DATA_SETTINGS
    settings = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    if not isinstance(settings, dict):
        raise SystemExit(f"{path}: give a mapping of data=folder settings, e.g. num_classes: 4")
    return tuple(f"data.{key}={_hydra_value(value)}" for key, value in settings.items())


def parse_family(text: str) -> Family:
    """``color_mnist`` (any ``conf/experiment/<name>/baseline.yaml``), or ``folder:<root>`` /
    ``folder:<root>:<concept spec>`` for ``data=folder`` (spec default: ``<root>/concepts.yaml``;
    settings from ``<root>/data.yaml``; oracle on ``<root>_unbiased`` where it holds a metadata file)."""
    if text.startswith("folder:"):
        root_text, _, spec = text[len("folder:"):].partition(":")
        root = Path(root_text).resolve()
        extra = (f"model.concepts.spec={Path(spec).resolve()}",) if spec else ()
        settings = folder_settings(root)
        twin = unbiased_twin(root)
        orc = (f"data.root={twin}", *settings) if (twin / "metadata.csv").is_file() else None
        return Family(f"folder:{root.name}", "folder", f"folder_{root.name}", (f"data.root={root}", *settings), extra, orc)
    if not (ROOT / "conf" / "experiment" / text / "baseline.yaml").is_file():
        raise SystemExit(f"--families {text}: no conf/experiment/{text}/baseline.yaml; give a family or folder:<root>")
    return Family(text, text, text)


# --------------------------------------------------------------------------- concept images
def _set_size(entry: Mapping[str, Any], spec_dir: Path) -> int:
    """Images of one concept set: a folder's image files where the folder exists, else its ``n``."""
    if "folder" in entry:
        folder = Path(str(entry["folder"]))
        folder = folder if folder.is_absolute() else spec_dir / folder
        if folder.is_dir():
            return sum(1 for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if "n" not in entry:
            raise FileNotFoundError(f"concept folder {folder} does not exist and the spec gives no n")
    return int(entry["n"])


def concept_image_count(spec: Path, terms: Sequence[Mapping[str, Any]], num_classes: int) -> int:
    """How many concept images a recipe's terms use: every set a term names, each counted once.

    A term ``{concept: "color_{y}", negative: grey}`` uses ``color_0`` .. ``color_{K-1}`` (those
    the spec has) and its negative set; a negative that is a split pool (``random`` with
    ``split: S``) counts whole, since the term reads all of it. Generated sets count their ``n``;
    folder sets the image files in the folder (its ``n`` if the folder is not written yet).
    TCAV's random pool is not counted unless a term uses it.

    Args:
        spec: The concept-set YAML.
        terms: The recipe's ``model.concepts.terms``.
        num_classes: ``K``, the values ``{y}`` takes.
    """
    sets = expand_templates((yaml.safe_load(spec.read_text()) or {}).get("sets", {}))
    used: set[str] = set()
    for term in terms:
        concept = str(term["concept"])
        names = [concept.format(y=k) for k in range(num_classes)] if "{y}" in concept else [concept]
        used.update(n for n in names if n in sets)
        used.add(str(term.get("negative", "random")))
    missing = sorted(n for n in used if n not in sets)
    if missing:
        raise KeyError(f"{spec}: no concept set {missing}")
    return sum(_set_size(sets[n], spec.parent) for n in sorted(used))


def family_concept_images(family: Family) -> int:
    """:func:`concept_image_count` of the family's default recipe, from its composed config."""
    from cdistill.concepts.__main__ import compose_config

    cfg = compose_config([f"experiment={family.key}/{DEFAULT_RECIPE}", f"paths.root_dir={ROOT}",
                          *family.overrides, *family.concept_overrides])
    spec = Path(str(cfg.model.concepts.spec))
    spec = spec if spec.is_absolute() else ROOT / spec
    terms = [dict(t) for t in cfg.model.concepts.terms]
    return concept_image_count(spec, terms, int(cfg.model.num_classes))


# --------------------------------------------------------------------------- cells
def cell_dir(runs: Path, family: Family, method: str, seed: int) -> Path:
    return runs / family.folder / f"{method}_seed{seed}"


def results_file(method: str, out: Path) -> Path:
    return out / ("pipeline.json" if method in CONCEPT_METHODS else "metrics.json")


def cell_command(family: Family, method: str, seed: int, runs: Path, extra: Sequence[str],
                 heldout: int | None = None) -> list[str]:
    """The ``train.py`` / ``pipeline.py`` command line of one cell (without the interpreter)."""
    out = cell_dir(runs, family, method, seed)
    rules = [f"++protocols.{rule}={metric}" for rule, metric in RULES.items()]
    if method in CONCEPT_METHODS:
        recipe, own = CONCEPT_METHODS[method]
        gray = "_gray" if family.key in GRAY_FAMILIES else ""
        base = cell_dir(runs, family, "erm", seed) / "student.pt"
        return ["pipeline.py", f"experiment={family.key}/{recipe}", *(o.format(gray=gray) for o in own),
                f"pipeline.seeds=[{seed}]", "pipeline.tcav.enabled=false", f"pipeline.base_ckpt={base}",
                *family.overrides, *family.concept_overrides, *rules, *extra, f"hydra.run.dir={out}"]
    name = "dfr" if method == MATCHED else method
    matched = [f"model.dfr.heldout_size={heldout}"] if method == MATCHED else []
    return ["train.py", f"experiment={family.key}/baseline", f"method={name}", f"seed={seed}", *matched,
            *family.overrides, *rules, *extra, f"paths.output_dir={out}", f"hydra.run.dir={out}"]


def read_metrics(method: str, out: Path) -> dict[str, float]:
    """The tested model's metrics: ``metrics.json``, or the fine-tune's record in ``pipeline.json``."""
    data = json.loads(results_file(method, out).read_text())
    return dict(data[0]["cd"]) if method in CONCEPT_METHODS else dict(data)


def random_cue_split(family: Family, extra: Sequence[str] = ()) -> str | None:
    """The family's test split whose cue is drawn independently of the label: its datamodule's
    ``random_cue_split`` (a folder dataset's ``data.random_cue_split``), None where it has none.
    A reversed test pairs each class with one other cue, which a method fitted on
    ``val_reversed`` can learn; a random cue cannot be."""
    import hydra.utils

    from cdistill.concepts.__main__ import compose_config

    data = compose_config([f"experiment={family.key}/baseline", f"paths.root_dir={ROOT}", *family.overrides,
                           *extra]).data
    if "random_cue_split" in data:
        return None if data.random_cue_split is None else str(data.random_cue_split)
    split = getattr(hydra.utils.get_class(str(data._target_)), "random_cue_split", None)
    return None if split is None else str(split)


def row_from_metrics(metrics: Mapping[str, float], random_test: str | None) -> dict[str, Any]:
    """Per rule: test, bias-conflicting, worst-group and random-cue test accuracy in % (on the
    split ``random_test``: :func:`random_cue_split`), the selected epoch, and DFR's held-out size
    where logged."""
    row: dict[str, Any] = {}
    for rule in RULES:
        for key, _ in METRICS:
            name = f"{rule}/{random_test}/acc" if key == "acc_random" else f"{rule}/test/{key}"
            value = metrics.get(name) if key != "acc_random" or random_test else None
            row[f"{rule}/{key}"] = None if value is None else 100 * float(value)
        row[f"{rule}/epoch"] = metrics.get(f"{rule}/selected_epoch")
        if f"{rule}/test/dfr_heldout_size" in metrics:
            row[f"{rule}/dfr_heldout_size"] = int(metrics[f"{rule}/test/dfr_heldout_size"])
    return row


def _reason(text: str) -> str:
    """What a failed run's stderr says went wrong: its last ``...Error: ...`` line, else its last
    paragraph (Hydra's override errors), without Hydra's stack-trace hint; shortened."""
    text = "\n".join(ln for ln in text.splitlines() if "HYDRA_FULL_ERROR" not in ln).strip()
    errors = re.findall(r"^\S*(?:Error|Exception)\b.*$", text, flags=re.MULTILINE)
    if errors:
        return errors[-1][:240]
    last = text.split("\n\n")[-1] if text else "no output"
    return " / ".join(ln.strip() for ln in last.splitlines() if ln.strip())[:240]


def _children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def launch(argv: list[str], log: Path, timeout: float | None) -> tuple[str, float, float]:
    """Run one command; ``("ok" | "failed: <reason>" | "not run: budget ...", wall seconds, CPU
    seconds)``. The CPU time (user + system, all threads) does not grow with the machine's load,
    where the wall time does."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.time(), _children_cpu()
    try:
        proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "WANDB_MODE": "offline"})
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        log.write_text(out[-20000:])
        return f"not run: budget (stopped after {time.time() - t0:.0f} s)", time.time() - t0, _children_cpu() - c0
    wall, cpu = time.time() - t0, _children_cpu() - c0
    log.write_text(proc.stdout[-20000:] + "\n" + proc.stderr[-20000:])
    if proc.returncode:
        return f"failed: {_reason(proc.stderr)} (log: {log})", wall, cpu
    return "ok", wall, cpu


@dataclass
class Budget:
    """Minutes for the whole command (None: unlimited); a cell starts only if the wall time of
    earlier cells of the same (family, method) says it fits, and is stopped when time runs out."""

    minutes: float | None
    start: float = field(default_factory=time.time)
    walls: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    #: Run nothing: read the finished cells and record the others as not run (``--read-only``).
    read_only: bool = False

    @property
    def refusal(self) -> str:
        """The status of a cell this budget does not let run."""
        return "not run: not finished yet (--read-only)" if self.read_only else "not run: budget"

    def left(self) -> float | None:
        return None if self.minutes is None else 60 * self.minutes - (time.time() - self.start)

    def fits(self, family: str, method: str) -> bool:
        if self.read_only:
            return False
        left = self.left()
        if left is None:
            return True
        seen = self.walls.get((family, method), [])
        return left > (float(np.median(seen)) if seen else 0.0)

    def record(self, family: str, method: str, wall: float | None) -> None:
        if wall is not None:
            self.walls.setdefault((family, method), []).append(wall)


#: Overrides the oracle does not take: it is ``data.unbiased=true`` (``conflicting_fraction`` 1).
NOT_FOR_ORACLE = ("data.conflicting_fraction=",)


def _oracle_acc(family: Family, seed: int, runs: Path, extra: Sequence[str]) -> tuple[float | None, str]:
    if family.oracle is None:
        return None, NO_ORACLE
    extra = [o for o in extra if not o.lstrip("+").startswith(NOT_FOR_ORACLE)]
    try:
        metrics = oracle(family.key, seed, runs, [*family.oracle, *extra], folder=family.folder, unbiased=())
    except SystemExit as err:  # generality's runner stops with the log's path and the error
        return None, f"failed: {str(err).splitlines()[0][:240]}"
    return 100 * float(metrics["strict/test/acc"]), "ok"


def run_cell(family: Family, method: str, seed: int, runs: Path, extra: Sequence[str], budget: Budget,
             erm_status: str | None = None, heldout: int | None = None,
             random_test: str | None = None) -> dict[str, Any]:
    """One cell's JSONL row: read from its run directory if it is complete, else run (or record
    why not). ``erm_status``: the ERM cell's status, for a concept method that fine-tunes it;
    ``random_test``: the family's random-cue test split (:func:`random_cue_split`)."""
    out = cell_dir(runs, family, method, seed)
    row: dict[str, Any] = {"family": family.label, "method": method, "seed": seed, "run_dir": str(out),
                           "supervision": supervision(method), "status": "ok", "wall_s": None}
    if heldout is not None:
        row["concept_images"] = heldout
    argv = cell_command(family, method, seed, runs, extra, heldout)
    row["command"] = " ".join(argv)
    if results_file(method, out).exists():  # cached
        cell = out / CELL_FILE
        timing = json.loads(cell.read_text()) if cell.exists() else {}
        row["wall_s"], row["cpu_s"] = timing.get("wall_s"), timing.get("cpu_s")
        row["cached"] = True
    elif method in CONCEPT_METHODS and erm_status != "ok":
        row["status"] = f"not run: its ERM base model is missing (erm: {erm_status})"
        return row
    elif budget.read_only and (out / "compare.log").is_file():
        # launch() writes the log when the run ends; no results beside it: the run failed (an
        # interrupted one leaves no log). Say why, as the live run did, not "not finished yet".
        row["status"] = f"failed: {_reason((out / 'compare.log').read_text())} (log: {out / 'compare.log'})"
        return row
    elif not budget.fits(family.label, method):
        row["status"] = budget.refusal
        return row
    else:
        left = budget.left()
        status, wall, cpu = launch(argv, out / "compare.log", None if left is None else max(left, 1.0))
        row["status"], row["wall_s"], row["cpu_s"] = status, round(wall, 1), round(cpu, 1)
        if status != "ok":
            return row
        (out / CELL_FILE).write_text(json.dumps({"wall_s": row["wall_s"], "cpu_s": row["cpu_s"], "command": row["command"]}))
    budget.record(family.label, method, row["wall_s"])
    try:
        row.update(row_from_metrics(read_metrics(method, out), random_test))
    except (OSError, ValueError, KeyError, IndexError) as err:
        row["status"] = f"failed: unreadable results ({err})"
    return row


def supervision(method: str) -> str:
    """The method's supervision from the registry (``dfr_matched`` is DFR)."""
    return METHOD_SUPERVISION.get("dfr" if method == MATCHED else method, "?")


def available(family: Family, method: str) -> bool:
    """Whether the family has the method's experiment (a concept recipe may exist for some only)."""
    if method not in CONCEPT_METHODS:
        return True
    return (ROOT / "conf" / "experiment" / family.key / f"{CONCEPT_METHODS[method][0]}.yaml").is_file()


def run_all(families: Sequence[Family], methods: Sequence[str], seeds: Sequence[int], runs: Path,
            out: Path, extra: Sequence[str], budget: Budget) -> list[dict[str, Any]]:
    """Every (family, seed, method) cell, ERM first; each row appended to ``out`` as it ends."""
    methods = ["erm", *[m for m in methods if m != "erm"]]
    rows: list[dict[str, Any]] = []
    out.parent.mkdir(parents=True, exist_ok=True)

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        shown = {k: row[k] for k in ("family", "method", "seed", "status", "wall_s")}
        shown |= {k: round(row[k], 2) for k in ("strict/acc", "worst/acc", "oracle_acc") if row.get(k) is not None}
        print(json.dumps(shown), flush=True)

    for family in families:
        heldout: int | None = None
        try:
            random_test = random_cue_split(family, extra)
        except Exception as err:  # a config that does not compose: its cells fail and say why
            print(f"{family.label}: no random-cue split read ({err})", flush=True)
            random_test = None
        for seed in seeds:
            erm_status: str | None = None
            orc: tuple[float | None, str] | None = None
            for method in methods:
                if not available(family, method):
                    emit({"family": family.label, "method": method, "seed": seed, "supervision": supervision(method),
                          "status": f"not run: no experiment {family.key}/{CONCEPT_METHODS[method][0]}",
                          "wall_s": None})
                    continue
                if method == MATCHED and heldout is None:
                    try:
                        heldout = family_concept_images(family)
                    except Exception as err:  # a spec that cannot be read: this cell fails, the rest run
                        emit({"family": family.label, "method": method, "seed": seed,
                              "supervision": supervision(method), "wall_s": None,
                              "status": f"failed: concept images of {family.key}/{DEFAULT_RECIPE} not counted ({err})"})
                        continue
                row = run_cell(family, method, seed, runs, extra, budget, erm_status,
                               heldout if method == MATCHED else None, random_test)
                if method == "erm":
                    erm_status = row["status"]
                if orc is None and erm_status == "ok":  # the oracle once per (family, seed); a trained one is read
                    trained = (runs / family.folder / f"oracle_seed{seed}" / "metrics.json").exists()
                    orc = _oracle_acc(family, seed, runs, extra) \
                        if family.oracle is None or trained or budget.fits(family.label, "oracle") else (None, budget.refusal)
                row["oracle_acc"], row["oracle_status"] = orc if orc else (None, "not run: ERM did not run")
                emit(row)
    return rows


# --------------------------------------------------------------------------- table
def latest(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str, int], Mapping[str, Any]]:
    """The last row of each (family, method, seed): a rerun replaces a failed or budgeted one."""
    out: dict[tuple[str, str, int], Mapping[str, Any]] = {}
    for r in rows:
        out[(r["family"], r["method"], int(r["seed"]))] = r
    return out


def _ok(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in rows if r.get("status") == "ok"]


def gaps(cells: Mapping[tuple[str, str, int], Mapping[str, Any]], family: str, method: str, rule: str) -> list[float]:
    """Per seed ``(m - ERM) / (oracle - ERM)`` (test accuracy under ``rule``; the oracle's under
    strict), for the seeds where the method, ERM and the oracle ran and ``oracle - ERM > MIN_GAP``."""
    out = []
    for (fam, meth, seed), r in cells.items():
        erm = cells.get((fam, "erm", seed))
        if fam != family or meth != method or r.get("status") != "ok" or not erm or erm.get("status") != "ok":
            continue
        m, b, o = r.get(f"{rule}/acc"), erm.get(f"{rule}/acc"), r.get("oracle_acc")
        if m is not None and b is not None and o is not None and o - b > MIN_GAP:
            out.append((m - b) / (o - b))
    return out


def _no_gap(rows: Sequence[Mapping[str, Any]]) -> str:
    """The gap-closed cell where no seed gives a gap: why, when the family has no oracle; else n/a."""
    statuses = {r.get("oracle_status") for r in _ok(rows)}
    return NO_ORACLE if statuses == {NO_ORACLE} else "n/a"


def _status_note(rows: Sequence[Mapping[str, Any]]) -> str:
    bad = [str(r["status"]) for r in rows if r.get("status") != "ok"]
    if not bad:
        return ""
    kinds = sorted({b.split(":")[0] + (": budget" if "budget" in b else "") for b in bad})
    return f" ({len(rows) - len(bad)}/{len(rows)} seeds; {', '.join(kinds)})"


def cell_text(rows: Sequence[Mapping[str, Any]], key: str, scale: float = 1.0) -> str:
    """``mean ± std`` over the seeds that ran, with how many did not; the status where none did."""
    if not rows:
        return MISSING
    ok = [r for r in _ok(rows) if r.get(key) is not None]
    if not ok:
        statuses = sorted({str(r.get("status")) for r in rows if r.get("status") != "ok"})
        return "; ".join(s.split(" (log:")[0] for s in statuses)[:120].replace("|", "/") or MISSING
    return mean_std([float(r[key]) for r in ok], scale=scale, digits=1) + _status_note(rows)


def _by(cells: Mapping[tuple[str, str, int], Mapping[str, Any]], family: str, method: str) -> list[Mapping[str, Any]]:
    return [r for (f, m, _), r in sorted(cells.items(), key=lambda kv: kv[0][2]) if f == family and m == method]


def _order(values: Sequence[str], known: Sequence[str]) -> list[str]:
    seen = list(dict.fromkeys(values))
    return [v for v in known if v in seen] + [v for v in seen if v not in known]


def table(rows: Sequence[Mapping[str, Any]], png: str | None = None) -> str:
    """The markdown report: per selection rule one table per metric (methods x families), the
    gap closed, wall time, the recipe-vs-DFR table, and every cell that did not run."""
    cells = latest(rows)
    families = list(dict.fromkeys(f for f, _, _ in cells))
    methods = _order([m for _, m, _ in cells], ALL_METHODS)
    seeds = sorted({s for _, _, s in cells})
    head = "| method | supervision | " + " | ".join(families) + " |"
    sep = "|---|---|" + "---|" * len(families)
    md = [
        "# Concept methods and group-robust methods, side by side",
        "",
        f"Generated by `python benchmarks/compare.py --table <runs.jsonl>` from {len(cells)} cells "
        f"(seeds {', '.join(map(str, seeds))}). Test split, %, mean ± std over the seeds that ran; a cell "
        "says how many seeds did not run and why.",
        "",
        "**Rules.** Budget: every group method trains for its family's baseline epochs "
        "(`experiment=<family>/baseline`; JTT adds its identification epochs, DFR its last-layer refit, LfF "
        "trains a second, biased copy alongside); a concept method fine-tunes the ERM cell's model of the same "
        "seed for its recipe's epochs (its whole cost: its wall time plus the ERM cell's). Hyper-parameters: each method's "
        "defaults (conf/method/, the recipes' experiments), never tuned per family here. Selection: `strict` "
        "(best `val/acc`, the biased validation split) and `worst` (best worst-group accuracy over the "
        "validation splits pooled, `val_all/acc_worst_group`; on the MNIST families the conflicting groups are "
        "in `val_reversed`, which carries the test split's cue mapping). Random-cue test accuracy: a test split "
        "whose cue is drawn independently of the label (ColorMNIST `test_random_color`, MarkerMNIST "
        "`test_random_glyph`; TextureMNIST's and the faces proxy's `test` are so already; DecoyMNIST has none; "
        "a folder dataset: its `data.random_cue_split`): "
        "a method that learned the reversed test's cue mapping instead of the digit scores well on the "
        "reversed test and not here. DFR's held-out set is `val_random` (the validation digits with a random "
        "cue) where the family has it, else `val` ∪ `val_reversed`. Gap closed: `(method − ERM) / "
        f"(oracle − ERM)` per seed, oracle = `data.unbiased=true` baseline (strict; a folder family `folder:<root>`: "
        "the baseline on `<root>_unbiased`, its data with the training cue independent of the label, and "
        f"none without it), only where oracle − ERM > {MIN_GAP:g} points.",
        "",
    ]
    for rule in RULES:
        md += [f"## Selection: {rule}", ""]
        for key, title in METRICS:
            md += [f"### {title} ({rule})", "", head, sep]
            for m in methods:
                md.append(f"| {m} | {supervision(m)} | "
                          + " | ".join(cell_text(_by(cells, f, m), f"{rule}/{key}") for f in families) + " |")
            md.append("")
        md += [f"### gap closed to the oracle ({rule})", "", head, sep]
        for m in methods:
            texts = []
            for f in families:
                g = gaps(cells, f, m, rule)
                text = mean_std(g, scale=100, digits=0) + "%" if g else _no_gap(_by(cells, f, m))
                text = text[1:] if text.startswith("-0 ") else text  # -0.3% rounds to 0, not "-0"
                texts.append("reference" if m == "erm" else text)
            md.append(f"| {m} | {supervision(m)} | " + " | ".join(texts) + " |")
        md.append("")
    for key, title in TIMES:
        md += [f"## {title}", "", head, sep]
        for m in methods:
            md.append(f"| {m} | {supervision(m)} | " + " | ".join(cell_text(_by(cells, f, m), key) for f in families) + " |")
        md.append("")
    md += [*matched_table(cells, families), "", *not_run(cells)]
    if png:
        md += ["", f"![gap closed and bias-conflicting accuracy]({png})"]
    return "\n".join(md) + "\n"


def matched_table(cells: Mapping[tuple[str, str, int], Mapping[str, Any]], families: Sequence[str]) -> list[str]:
    """The default concept recipe against DFR given as many held-out labelled images."""
    md = ["## The default concept recipe vs DFR with the same number of held-out images (strict)", "",
          f"`{MATCHED}` is DFR with `model.dfr.heldout_size` = the number of concept images `{DEFAULT_RECIPE}` uses "
          "on that family: every set its bias term names (each cue value's set and the negative set, a split "
          "pool counted whole; generated sets by their `n`, folder sets by their files). DFR's held-out set is "
          "group-balanced and capped by the smallest group, so it can use fewer (column `DFR used`). DFR's "
          "held-out images are labelled with their group and drawn from `val_random` (validation digits with a "
          "random cue, so the refit never sees the reversed test's cue mapping) where the family has it, else "
          "from `val` ∪ `val_reversed` (the faces proxy: unbiased validation faces).", "",
          "| family | concept images | DFR used | " + " | ".join(f"{m}: {short}" for _, short in SHORT for m in (DEFAULT_RECIPE, MATCHED))
          + " |", "|---|---|---|" + "---|" * (2 * len(SHORT))]
    for f in families:
        cd, dfr = _by(cells, f, DEFAULT_RECIPE), _by(cells, f, MATCHED)
        if not cd and not dfr:
            continue
        n = sorted({str(r["concept_images"]) for r in dfr if r.get("concept_images") is not None})
        used = sorted({str(r["strict/dfr_heldout_size"]) for r in _ok(dfr) if r.get("strict/dfr_heldout_size") is not None})
        md.append(f"| {f} | {', '.join(n) or MISSING} | {', '.join(used) or MISSING} | "
                  + " | ".join(cell_text(rs, f"strict/{k}") for k, _ in SHORT for rs in (cd, dfr)) + " |")
    return md


def not_run(cells: Mapping[tuple[str, str, int], Mapping[str, Any]]) -> list[str]:
    """Every cell that failed or was not run, with its status (never dropped silently)."""
    bad = [(k, r) for k, r in cells.items() if r.get("status") != "ok"]
    md = ["## Cells that did not run", ""]
    if not bad:
        return [*md, "None: every cell ran."]
    md += ["| family | method | seed | status |", "|---|---|---|---|"]
    md += [f"| {f} | {m} | {s} | {str(r['status']).replace('|', '/')} |" for (f, m, s), r in sorted(bad)]
    return md


def heatmap(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Methods x families: gap closed (strict, mean over seeds) and bias-conflicting test accuracy
    (strict, mean over seeds); grey where nothing ran or the gap is too narrow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = latest(rows)
    families = list(dict.fromkeys(f for f, _, _ in cells))
    methods = _order([m for _, m, _ in cells], ALL_METHODS)
    gap = np.full((len(methods), len(families)), np.nan)
    conf = np.full_like(gap, np.nan)
    for i, m in enumerate(methods):
        for j, f in enumerate(families):
            g = gaps(cells, f, m, "strict")
            gap[i, j] = 100 * float(np.mean(g)) if g else np.nan
            vals = [r["strict/acc_conflicting"] for r in _ok(_by(cells, f, m)) if r.get("strict/acc_conflicting") is not None]
            conf[i, j] = float(np.mean(vals)) if vals else np.nan
    fig, axes = plt.subplots(1, 2, figsize=(7 + 2 * len(families), 1.5 + 0.45 * len(methods)), squeeze=False)
    for ax, data, title, lim in ((axes[0, 0], gap, "gap closed (strict, %)", (0, 100)),
                                 (axes[0, 1], conf, "conflicting acc (strict, %)", (0, 100))):
        cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
        ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=lim[0], vmax=lim[1], aspect="auto")
        ax.set_xticks(range(len(families)), families, rotation=30, ha="right")
        ax.set_yticks(range(len(methods)), [f"{m} ({supervision(m)})" for m in methods])
        ax.set_title(title)
        for i in range(len(methods)):
            for j in range(len(families)):
                ax.text(j, i, "n/a" if np.isnan(data[i, j]) else f"{round(data[i, j]):d}", ha="center", va="center",
                        color="black" if np.isnan(data[i, j]) or data[i, j] > 50 else "white", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(jsonl: Path, md_path: Path) -> str:
    """``compare.md`` and its heat map (same name, ``.png``) from a JSONL of cells."""
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    png = md_path.with_suffix(".png")
    heatmap(rows, png)
    text = table(rows, png.name)
    md_path.write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=[], help="family names, or folder:<root>[:<concept spec>]")
    ap.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--budget-min", type=float, default=None, help="wall minutes for the whole command")
    ap.add_argument("--read-only", action="store_true", help="run nothing: rows of the finished cells only")
    ap.add_argument("--runs", type=Path, default=ROOT / "logs" / "compare")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compare_runs.jsonl")
    ap.add_argument("--table", type=Path, default=None, help="write the report of a JSONL file and exit")
    ap.add_argument("--md", type=Path, default=None, help="report path (default: compare.md beside the JSONL)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of every cell and the oracle (after --)")
    args = ap.parse_args(argv)
    if args.table:
        print(write_report(args.table, args.md or args.table.parent / "compare.md"))
        return
    if not args.families:
        ap.error("give --families (or --table)")
    families = [parse_family(f) for f in args.families]
    run_all(families, args.methods, args.seeds, args.runs.resolve(), args.out, args.overrides,
            Budget(args.budget_min, read_only=args.read_only))
    print(write_report(args.out, args.md or args.out.parent / "compare.md"))


if __name__ == "__main__":
    main()
