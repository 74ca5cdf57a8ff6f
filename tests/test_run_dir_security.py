"""A run directory someone sends you is untrusted input (issue 27, rows 1-3 and 9): a crafted ``last.pt`` or shard
folder never runs code, never writes or deletes outside the run directory, and every damaged part is one
``Error:`` line with nothing on disk changed. Each test names the row it covers."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from finetune import config
from finetune.parallel import sharded
from finetune.errors import CheckpointError
from finetune.training.freeze import apply_freeze
from finetune.models import build_model
from finetune.training.optim import build_optimizer

from helpers import tiny_tree

# the shared fixture trains two runs (a few seconds): the quick loop (-m "not slow") leaves this file out
pytestmark = pytest.mark.slow

FAST = ("--batch-size", "8", "--precision", "fp32", "--device", "cpu", "--no-tensorboard", "--quiet")


def one_error(r) -> str:
    """The error contract: exit 1, one ``Error:`` line on stderr, no traceback; returns the line."""
    assert r.exit_code == 1, (r.stdout, r.stderr)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and lines and lines[-1].startswith("Error: "), r.stderr
    return lines[-1]


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root`` (links as their target text, not followed): compare before and after."""
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        if p.is_symlink():
            out[key] = "-> " + str(p.readlink())
        elif p.is_file():
            out[key] = p.read_bytes()
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A finished 2-epoch smallcnn run keeping its 2 best epochs (top_k), and the same run stopped after epoch 1
    with its last.pt rewritten as an FSDP run writes it (weights and optimizer state as DCP shards)."""
    from typer.testing import CliRunner

    from finetune.cli.app import app

    root = tmp_path_factory.mktemp("sec")
    data = tiny_tree(root / "data", per_class=8)
    common = ["--data", str(data), "--model", "smallcnn", "--weights", "none", "--recipe", "full-finetune",
              "--image-size", "32", *FAST]
    r = CliRunner().invoke(app, ["train", "--out", str(root / "run"), "--epochs", "2", "--save-top-k", "2", *common])
    assert r.exit_code == 0, r.stderr
    r = CliRunner().invoke(app, ["train", "--out", str(root / "sharded"), "--epochs", "1", *common])
    assert r.exit_code == 0, r.stderr
    make_sharded(root / "sharded")
    return root


def make_sharded(run: Path) -> None:
    ck = torch.load(run / "last.pt", weights_only=True)
    cfg = config.from_dict(ck["recipe"])
    bb = build_model("smallcnn", num_classes=ck["num_classes"], weights="none")
    apply_freeze(bb, cfg.freeze)
    opt = build_optimizer(bb, cfg.optimizer)
    bb.model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    entry = sharded.save(bb.model, opt, run, ck["epoch"], SimpleNamespace(is_main=True, world_size=1, enabled=False))
    torch.save({**ck, "model": {}, "optimizer": None, "sharded": entry}, run / "last.pt")


def copy(base: Path, name: str, tmp_path: Path) -> Path:
    run = tmp_path / name
    shutil.copytree(base / name, run, symlinks=True)
    return run


class Payload:
    """Unpickled, it creates ``path``: what a crafted pickle would do with os.system."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_sharded_run_still_evaluates_and_resumes(base, tmp_path, cli):
    """The control for the rows below: the real shards read by the restricted reader give last.pt's weights."""
    run = copy(base, "sharded", tmp_path)
    from finetune.run.checkpoint import load_checkpoint

    ck = load_checkpoint(run / "last.pt")
    ref = torch.load(base / "sharded" / "best.pt", weights_only=True)["model"]
    assert sorted(ck["model"]) == sorted(ref) and all(torch.equal(ck["model"][k], ref[k]) for k in ref)
    r = cli("train", "--resume", run, "--epochs", "2", "--quiet")
    assert r.exit_code == 0, r.stderr
    after = torch.load(run / "last.pt", weights_only=True)
    assert after["epoch"] == 2 and "sharded" not in after and not (run / "shards").exists()


# row 1: code execution through FSDP shards


def test_pickled_payload_in_shard_metadata_never_runs(base, tmp_path, cli):
    run = copy(base, "sharded", tmp_path)
    marker = tmp_path / "pwned"
    meta = run / "shards" / "e0001" / ".metadata"
    meta.write_bytes(pickle.dumps(Payload(marker)))
    (run / "best.pt").unlink()  # eval RUN then reads last.pt, and a resume rebuilds best.pt from it
    before = snapshot(run)
    msg = (f"Error: refusing to read '{meta}': it is not torch.distributed.checkpoint metadata ('io.open' is "
           "not part of torch.distributed.checkpoint's metadata); it is damaged or was not written by finetune")
    for args in (("eval", run), ("eval", run / "last.pt"), ("train", "--resume", run, "--epochs", "2", "--quiet"),
                 ("predict", run / "last.pt", base / "data" / "a"), ("export", run / "last.pt", "--out",
                                                                    tmp_path / "m.pt")):
        assert one_error(cli(*args)) == msg, args
        assert not marker.exists(), args
    assert snapshot(run) == before


def _redirect_bytes_records(run: Path, payload_file: str, payload: bytes) -> None:
    """Point the optimizer's lr record, and a new record under model/, at a torch.save'd pickle payload: the
    metadata itself stays made of DCP's own classes."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    folder = run / "shards" / "e0001"
    md = sharded.read_metadata(folder)
    (folder / payload_file).write_bytes(payload)
    info = _StorageInfo(relative_path=payload_file, offset=0, length=len(payload))
    for key in [k for k in md.storage_data if k.fqn == "optim.param_groups.0.lr"]:
        md.storage_data[key] = info
    md.state_dict_metadata["model.evil"] = BytesStorageMetadata()
    md.storage_data[MetadataIndex(fqn="model.evil")] = info
    if isinstance(md.planner_data, dict):
        md.planner_data["model.evil"] = ("model", "evil")
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(md, f)


def test_pickled_payload_in_a_shard_record_never_runs(base, tmp_path, cli):
    """DCP's planner unpickles non-tensor records (the optimizer's param_groups) with weights_only=False."""
    run = copy(base, "sharded", tmp_path)
    marker = tmp_path / "pwned"
    import io

    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    _redirect_bytes_records(run, "__7_0.distcp", buf.getvalue())
    before = snapshot(run)
    r = cli("eval", run / "last.pt")
    line = one_error(r)
    assert line.startswith(f"Error: cannot read the sharded weights in '{run / 'shards' / 'e0001'}': "), line
    assert line.endswith("; they are damaged or incomplete: resume from a whole copy of the run directory"), line
    assert not marker.exists()
    ck = torch.load(run / "last.pt", weights_only=True)
    cfg = config.from_dict(ck["recipe"])
    bb = build_model("smallcnn", num_classes=3, weights="none")
    apply_freeze(bb, cfg.freeze)
    with pytest.raises(CheckpointError, match="cannot read the sharded weights"):
        sharded.load_into(bb.model, build_optimizer(bb, cfg.optimizer), run, ck["sharded"])
    assert not marker.exists()
    assert snapshot(run) == before


def test_shard_metadata_naming_files_outside_its_folder_is_refused(base, tmp_path, cli):
    run = copy(base, "sharded", tmp_path)
    (tmp_path / "outside.distcp").write_bytes(b"x" * 64)
    _redirect_bytes_records(run, "__7_0.distcp", b"")
    folder = run / "shards" / "e0001"
    md = sharded.read_metadata(folder)
    for key, info in list(md.storage_data.items()):
        if info.relative_path == "__7_0.distcp":
            md.storage_data[key] = type(info)(relative_path="../../outside.distcp", offset=0, length=64)
    (folder / ".metadata").write_bytes(pickle.dumps(md))
    assert one_error(cli("eval", run / "last.pt")) == (
        f"Error: refusing to read '{folder / '.metadata'}': its records do not name shard files of that folder "
        "(__R_N.distcp); it is damaged or was not written by finetune")


# row 2: writes outside the run directory through top_k


@pytest.mark.parametrize("name", ["../../victim.txt", "ABSOLUTE", "best.pt", "epoch002.pt/../../victim.txt"])
def test_top_k_file_names_outside_the_run_are_refused(base, tmp_path, cli, name):
    run = copy(base, "run", tmp_path / "a" / "b")
    victim = tmp_path / "a" / "victim.txt"
    victim.write_text("ssh-ed25519 AAAA me@host\n")
    name = str(victim) if name == "ABSOLUTE" else name
    ck = torch.load(run / "last.pt", weights_only=True)
    assert [e["file"] for e in ck["top_k"]] and ck["epoch"] == 2
    top = [{**e, "file": name} if e["epoch"] == 2 else e for e in ck["top_k"]]
    torch.save({**ck, "top_k": top}, run / "last.pt")
    (run / "best.pt").unlink()  # so that eval and resume want to rebuild the epoch files
    before = snapshot(tmp_path)
    msg = (f"Error: '{run / 'last.pt'}' is not a valid finetune checkpoint: top_k must list the run's epochNNN.pt "
           f"files by their bare names, got '{name}'; it is damaged or was not written by finetune")
    for args in (("eval", run), ("eval", run / "last.pt"), ("train", "--resume", run, "--epochs", "3", "--quiet")):
        assert one_error(cli(*args)) == msg, args
    assert snapshot(tmp_path) == before
    assert victim.read_text() == "ssh-ed25519 AAAA me@host\n"


def test_sharded_path_outside_the_shards_folder_is_refused(base, tmp_path, cli):
    run = copy(base, "sharded", tmp_path)
    ck = torch.load(run / "last.pt", weights_only=True)
    torch.save({**ck, "sharded": {**ck["sharded"], "path": "shards/e0001/../../.."}}, run / "last.pt")
    assert one_error(cli("eval", run / "last.pt")) == (
        f"Error: '{run / 'last.pt'}' is not a valid finetune checkpoint: sharded.path must name a shards/eNNNN "
        "folder of the run, got 'shards/e0001/../../..'; it is damaged or was not written by finetune")


# row 3: deletion outside the run directory through shards


def test_resume_never_deletes_through_a_symlinked_shards_folder(base, tmp_path, cli):
    run = copy(base, "sharded", tmp_path)
    outside = tmp_path / "precious"
    shutil.move(run / "shards", outside)
    (outside / "e0000").mkdir()
    (outside / "e0000" / "thesis.tex").write_text("years of work\n")
    (run / "shards").symlink_to(outside, target_is_directory=True)
    before = snapshot(tmp_path)
    assert one_error(cli("train", "--resume", run, "--epochs", "2", "--quiet")) == (
        f"Error: '{run / 'shards'}' is a symbolic link; sharded weights are read only from real files inside the run "
        "directory; replace the link by a copy of what it points to")
    assert snapshot(tmp_path) == before


def test_stale_shard_entries_are_removed_without_following_links(base, tmp_path, cli):
    run = copy(base, "sharded", tmp_path)
    outside = tmp_path / "precious"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "notes.txt").write_text("keep me\n")
    (outside / "file.txt").write_text("keep me too\n")
    shards = run / "shards"
    (shards / "e0000").symlink_to(outside, target_is_directory=True)  # a stale entry that is a link
    (shards / "e0003").symlink_to(outside / "file.txt")
    (shards / "e0002").mkdir()  # a torn, uncommitted epoch: removed
    (shards / "e0002" / "__0_0.distcp").write_bytes(b"torn")
    (shards / "mine").mkdir()  # not a name finetune writes: left alone
    (shards / "mine" / "x").write_text("x\n")
    assert sharded.remove_stale(run, "shards/e0001") == ["shards/e0000", "shards/e0002", "shards/e0003"]
    assert sorted(p.name for p in shards.iterdir()) == ["e0001", "mine"]
    assert (outside / "sub" / "notes.txt").read_text() == "keep me\n"
    assert (outside / "file.txt").read_text() == "keep me too\n"
    assert sharded.remove_stale(run, None) == ["shards/e0001"]
    assert sorted(p.name for p in shards.iterdir()) == ["mine"]  # shards/ stays: it is not empty


def test_symlinked_shard_folder_is_not_read(base, tmp_path, cli):
    run = copy(base, "sharded", tmp_path)
    shutil.move(run / "shards" / "e0001", tmp_path / "elsewhere")
    (run / "shards" / "e0001").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert one_error(cli("eval", run / "last.pt")) == (
        f"Error: '{run / 'shards' / 'e0001'}' is a symbolic link; sharded weights are read only from real files "
        "inside the run directory; replace the link by a copy of what it points to")


# row 9: a full disk, damaged shards, weights that are not a state_dict or do not fit the model


@pytest.mark.subprocess
def test_disk_full_while_writing_last_pt_is_one_error_and_keeps_the_old_file(tmp_path):
    """torch's zip writer reports a failed write as RuntimeError ("unexpected pos ..."): a process whose file size
    limit is 64 KiB meets it as on a full disk."""
    import subprocess
    import sys
    import textwrap

    (tmp_path / "last.pt").write_bytes(b"the previous checkpoint")
    code = textwrap.dedent(f"""
        import resource, signal, torch
        from finetune.run.checkpoint import save_checkpoint
        from finetune.errors import CheckpointError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        try:
            save_checkpoint({{"model": {{"w": torch.zeros(100_000)}}}}, {str(tmp_path / 'last.pt')!r})
        except CheckpointError as e:
            print("Error:", e)
    """)
    from helpers import cli_env

    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert p.returncode == 0, p.stderr
    out = p.stdout.strip()
    assert out.startswith(f"Error: cannot write checkpoint '{tmp_path / 'last.pt'}': the write failed ("), out
    assert out.endswith(" MiB free on its disk; is the disk full?); the previous checkpoint is unchanged"), out
    assert (tmp_path / "last.pt").read_bytes() == b"the previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left


@pytest.mark.parametrize("damage", ["missing", "truncated", "metadata_truncated"])
def test_damaged_shards_are_one_error(base, tmp_path, cli, damage):
    run = copy(base, "sharded", tmp_path)
    folder = run / "shards" / "e0001"
    if damage == "missing":
        (folder / "__0_0.distcp").unlink()
    elif damage == "truncated":
        data = (folder / "__0_0.distcp").read_bytes()
        (folder / "__0_0.distcp").write_bytes(data[: len(data) // 3])
    else:
        data = (folder / ".metadata").read_bytes()
        (folder / ".metadata").write_bytes(data[: len(data) // 2])
    before = snapshot(run)
    for args in (("eval", run / "last.pt"), ("train", "--resume", run, "--epochs", "2", "--quiet")):
        line = one_error(cli(*args))
        if damage == "metadata_truncated":
            assert line.startswith(f"Error: refusing to read '{folder / '.metadata'}': it is not "
                                   "torch.distributed.checkpoint metadata ("), line
        else:
            assert line.startswith(f"Error: cannot read the sharded weights in '{folder}': "), line
    assert snapshot(run) == before


@pytest.mark.parametrize("model,fragment", [
    ([1, 2, 3], "'model' must be a state_dict (parameter names to tensors), got list"),
    ({"features.0.weight": 3}, "'model' must be a state_dict (parameter names to tensors), got dict"),
    ("weights", "'model' must be a state_dict (parameter names to tensors), got str"),
])
def test_checkpoint_whose_model_is_not_a_state_dict(base, tmp_path, cli, model, fragment):
    ck = torch.load(base / "run" / "best.pt", weights_only=True)
    torch.save({**ck, "model": model}, tmp_path / "x.pt")
    assert one_error(cli("eval", tmp_path / "x.pt")) == (
        f"Error: '{tmp_path / 'x.pt'}' is not a valid finetune checkpoint: {fragment}; it is damaged or was not "
        "written by finetune")


def test_weights_that_do_not_fit_the_model_name(base, tmp_path, cli):
    run = copy(base, "run", tmp_path)
    for name in ("best.pt", "last.pt"):
        ck = torch.load(run / name, weights_only=True)
        sd = dict(ck["model"])
        key = next(k for k, v in sd.items() if v.dim() == 4)
        sd[key] = torch.zeros(1, 1, 1, 1)
        torch.save({**ck, "model": sd}, run / name)
    before = snapshot(run)
    for args in (("eval", run / "best.pt"), ("predict", run / "best.pt", base / "data" / "a"),
                 ("export", run / "best.pt", "--format", "torchscript", "--out", tmp_path / "m.pt"),
                 ("train", "--resume", run, "--epochs", "3")):
        line = one_error(cli(*args))
        path = run / ("last.pt" if args[0] == "train" else "best.pt")
        assert line.startswith(f"Error: '{path}' holds weights that cannot be loaded into smallcnn: size mismatch "
                               f"for {key}: "), line
        assert line.endswith("; it is damaged or was not written by finetune for this model"), line
    assert snapshot(run) == before
    assert not (tmp_path / "m.pt").exists()


def test_optimizer_state_that_does_not_fit(base, tmp_path, cli):
    run = copy(base, "run", tmp_path)
    ck = torch.load(run / "last.pt", weights_only=True)
    torch.save({**ck, "optimizer": {"state": {}, "param_groups": []}}, run / "last.pt")
    before = snapshot(run)
    line = one_error(cli("train", "--resume", run, "--epochs", "3"))
    assert line.startswith(f"Error: '{run / 'last.pt'}' holds an optimizer state that cannot be loaded into "
                           "smallcnn: "), line
    assert snapshot(run) == before


def test_a_stop_inside_torchs_checkpoint_writer_is_a_stop_not_a_full_disk(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM (raised as KeyboardInterrupt) while torch.save is writing reaches us as torch's
    RuntimeError ("unexpected pos ..."): it must stay a stop (exit 130), not read as a failed write."""
    import io

    from finetune import files
    from finetune.run.checkpoint import save_checkpoint

    class StopsMidWrite(io.BytesIO):
        writes = 0

        def write(self, b):
            self.writes += 1
            if self.writes == 3:
                raise KeyboardInterrupt
            return super().write(b)

    real_fdopen = files.os.fdopen

    def fdopen(fd, mode="r", *a, **k):  # the temp file, with a write that Ctrl-C interrupts
        real_fdopen(fd, mode).close()
        return StopsMidWrite()

    monkeypatch.setattr(files.os, "fdopen", fdopen)
    (tmp_path / "last.pt").write_bytes(b"the previous checkpoint")
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {"w": torch.zeros(100_000)}}, tmp_path / "last.pt")
    assert (tmp_path / "last.pt").read_bytes() == b"the previous checkpoint"
