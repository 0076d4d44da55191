"""The run layer: one setup, one run directory, no import cycles, and the drift bugs it removed.

Each "was a bug" test failed on the code before the run layer was rebuilt
(three copies of the setup sequence and of the forward count had drifted).
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from zotune.bench import step_cost_ratio
from zotune.cli import main
from zotune.config import TrainConfig
from zotune.methods import METHODS
from zotune.rundir import RunDir, read_summary

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "zotune"


def module_imports() -> dict[str, set[str]]:
    """zotune module -> the zotune modules it imports (anywhere in the file, lazy imports included)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                candidates = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            edges[name] |= {c for c in candidates if c in modules and c != name and not name.startswith(c + ".")}
    return {m: e for m, e in edges.items() if not modules[m].name == "__init__.py"}  # re-exports are not cycles


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in edges:
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    edges = module_imports()
    assert "zotune.train" in edges and "zotune.setup" in edges["zotune.train"]  # the parser sees imports
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_setup_is_the_one_place_a_run_is_built():
    """train, replay, bench, the API and the diagnostics build runs through zotune.setup only."""
    edges = module_imports()
    for user in ("zotune.train", "zotune.replay", "zotune.bench", "zotune.api", "zotune.diagnostics.fd_snr"):
        assert "zotune.setup" in edges[user], user
        assert not edges[user] & {"zotune.quantize", "zotune.calibration"} or user == "zotune.api", user
    importers = {m for m, e in edges.items() if "zotune.train" in e}
    assert importers == {"zotune.cli", "zotune.bench", "zotune.tune"}, "train.py is a hub again"  # what runs training


def tiny_run(tiny_llama, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(tiny_llama), "--task", "rotten-tomatoes", "--train-size", "32", "--dev-size", "4",
            "--batch-size", "4", "--lr", "1e-2", "--progress", "false", "--output-dir", str(out), *extra]


def test_was_a_bug_a_resumed_run_counts_forward_differences_at_their_cost(tiny_llama, tmp_path, capsys):
    """--difference forward --queries 4 costs 1 + 4 forwards a step, in the run and after a resume
    (replay used to recount 2 per query)."""
    out = tmp_path / "run"
    args = tiny_run(tiny_llama, out, "--method", "mezo-lora", "--difference", "forward", "--queries", "4")
    assert main([*args, "--steps", "2"]) == 0
    assert main(["train", "--resume", str(out), "--steps", "4", "--progress", "false"]) == 0
    assert json.loads((out / "summary.json").read_text())["forward_passes"] == 4 * 5


def test_was_a_bug_replay_rebuilds_the_run_in_its_own_dtype(tiny_llama, tmp_path, capsys):
    """A run trained over a bf16 base replays over a bf16 base (replay used to load float32 on CPU)."""
    out = tmp_path / "run"
    assert main([*tiny_run(tiny_llama, out, "--method", "mezo-lora", "--dtype", "bfloat16"), "--steps", "3"]) == 0
    capsys.readouterr()
    assert main(["replay", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dtype"] == "bfloat16" and result["bit_identical"] is True
    assert result["forward_passes"] == 3 * 2


def test_was_a_bug_the_step_cost_ratio_divides_by_the_forwards_the_step_makes():
    """agzo and fo-lora make 3 forward(-equivalents) a step: a step of 3 forwards' time costs 1.0x its
    forwards, not 1.5x "two forwards"."""
    assert METHODS["agzo"].forward_cost(1, "central") == 3 and METHODS["fo-lora"].forward_cost(1, "central") == 3
    assert step_cost_ratio(3.0, 1.0, 3) == 1.0
    assert step_cost_ratio(2.4, 1.0, 2) == pytest.approx(1.2)
    assert step_cost_ratio(None, 1.0, 2) != step_cost_ratio(None, 1.0, 2)  # NaN: not measured


def test_the_run_directory_reads_back_what_it_wrote(tmp_path):
    cfg = TrainConfig.make(method="ar1zo", ar1_scaling="canonical", output_dir=str(tmp_path / "r"), steps=7)
    run = RunDir.create(cfg)
    assert (run.path / "config.yaml").exists()
    again = RunDir.open(run.path).config(steps=9)  # a new length is recorded
    assert again.options["ar1_scaling"] == "canonical"
    assert RunDir.open(run.path).config().steps == 9
    with run.logs() as logs:
        logs.step({"step": 0, "seed": 0, "g": [0.5], "lr": 0.1})
        logs.metric({"step": 1, "loss": 0.7})
        logs.metric({"step": 1, "dev_acc": 0.6})
    (run.path / "trajectory.jsonl").open("a").write('{"step": 1, "g"')  # a kill mid-write
    assert [r["step"] for r in run.trajectory()] == [0]
    assert run.metrics(steps_done=1) == [{"step": 1, "loss": 0.7}]  # the eval of an unfinished step is dropped
    reader = RunDir(run.path, writable=False)  # torchrun ranks other than 0 never write
    reader.write_summary({"x": 1})
    assert reader.summary() is None
    assert read_summary(run.path) is None  # what tune, bench and the regime study ask: not finished
    run.write_summary({"x": 1})
    assert read_summary(run.path) == run.summary() == {"x": 1}


def test_a_method_option_round_trips_through_config_yaml(tmp_path):
    cfg = TrainConfig.make(method="lozo", lozo_rank=3, output_dir=str(tmp_path / "r"))
    run = RunDir.create(cfg)
    text = (run.path / "config.yaml").read_text()
    assert "lozo_rank: 3" in text and "lozo_nu: 50" in text and "ar1_scaling" not in text  # flat, its own only
    back = run.config()
    assert back.options["lozo_rank"] == 3 and back.to_dict() == cfg.to_dict()


NEW_METHOD = '''
"""A method written as a user would: one file, nothing else edited."""
from dataclasses import dataclass

from zotune.methods.base import Method, register
from zotune.options import Options, setting


@dataclass
class HeadOptions(Options):
    prefix = "head"
    rows: int = setting(4, "how many rows of the output embedding to train")

    def validate(self) -> None:
        self.check("head_rows", self.rows >= 1, ">= 1")


@register
class HeadRows(Method):
    """MeZO on the first rows of the (tied) embedding."""
    name = "head-rows"
    is_adapter = False
    options_cls = HeadOptions
    suggested_lr = 1e-2

    def prepare(self, model):
        for p in model.parameters():
            p.requires_grad_(False)
        weight = model.get_input_embeddings().weight
        self.params = {"embed": weight}
        self._rows = self.options.rows
        return model

    def views(self, step):
        return [("embed[:rows]", self.params["embed"].data[: self._rows])]
'''


def test_adding_a_method_is_adding_one_file(tiny_llama, tmp_path, request, capsys):
    """A method in a file of its own gets its flags, its YAML keys, validation before loading, the engine,
    resume and replay, without a line changed anywhere else."""
    import importlib.util

    (tmp_path / "head_rows.py").write_text(NEW_METHOD)
    spec = importlib.util.spec_from_file_location("head_rows", tmp_path / "head_rows.py")
    request.addfinalizer(lambda: METHODS.pop("head-rows", None))  # the registration stays in this test
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert "head-rows" in METHODS
    args = tiny_run(tiny_llama, tmp_path / "run", "--method", "head-rows", "--head-rows", "3")
    assert main([*args, "--head-rows", "0", "--steps", "2"]) == 2
    assert "head_rows must be >= 1, got 0" in capsys.readouterr().err  # validated before any model loads
    assert main([*args, "--steps", "2"]) == 0
    assert "head_rows: 3" in (tmp_path / "run" / "config.yaml").read_text()
    assert main(["train", "--resume", str(tmp_path / "run"), "--steps", "3", "--progress", "false"]) == 0
    capsys.readouterr()
    assert main(["replay", str(tmp_path / "run")]) == 0
    assert json.loads(capsys.readouterr().out)["bit_identical"] is True


def test_a_base_offloaded_to_disk_trains_with_the_in_memory_slopes(tiny_llama, tmp_path, capsys):
    """--max-memory smaller than the model puts layers on disk (accelerate); the LoRA factors stay on the
    CPU, and every logged slope g equals the in-memory run's (to float tolerance); full-weight methods
    are refused in one line before any model loads."""
    common = ("--method", "mezo-lora", "--steps", "3", "--dtype", "float32")
    assert main([*tiny_run(tiny_llama, tmp_path / "memory"), *common]) == 0
    capsys.readouterr()
    disk = tiny_run(tiny_llama, tmp_path / "disk", "--max-memory", "cpu=40KB")
    disk[disk.index("--progress") + 1] = "true"  # the log line says where the modules went
    assert main([*disk, *common]) == 0
    assert re.search(r"placement: .*\d+ on disk", capsys.readouterr().err)  # part of the base went to disk
    g = {run: [r["g"][0] for r in RunDir(tmp_path / run).trajectory()] for run in ("memory", "disk")}
    assert g["memory"] == pytest.approx(g["disk"], rel=1e-5, abs=1e-7)
    assert main([*tiny_run(tiny_llama, tmp_path / "full"), "--method", "mezo", "--max-memory", "cpu=40KB"]) == 2
    assert "use an adapter method" in capsys.readouterr().err


# ------------------------------------------------------------------ settings a user leaves unset follow the method
def test_settings_left_unset_are_the_methods_own():
    """`zotune train --method mezo` must not inherit the default zoact's Adam and lr 2e-3 (Adam would add two
    model-sized moments to full-weight MeZO, and 2e-3 diverges it): unset lr, optimizer, queries and steps
    come from the method; what the user gives wins; and every method's no-flag run costs 400 forwards."""
    from zotune.config import TrainConfig
    from zotune.methods import METHODS, get_method

    main = TrainConfig()
    assert (main.method, main.optimizer, main.queries, main.lr, main.steps) == ("zoact", "adam", 2, 2e-3, 100)
    assert TrainConfig.make() == main
    mezo = TrainConfig.make(method="mezo")
    assert (mezo.optimizer, mezo.queries, mezo.lr, mezo.steps) == ("sgd", 1, get_method("mezo").suggested_lr, 200)
    given = TrainConfig.make(method="mezo", lr=1e-5, optimizer="momentum", steps=7)
    assert (given.lr, given.optimizer, given.steps) == (1e-5, "momentum", 7)
    for name, cls in METHODS.items():
        cfg = TrainConfig.make(method=name)
        assert abs(cfg.steps * cls.forwards_per_step(cfg) - 400) <= 2, name
    # a saved config (every key written) reads back as it was, whatever the method's defaults are now
    assert TrainConfig.from_dict(mezo.to_dict() | {"method": "zoact"}).optimizer == "sgd"
