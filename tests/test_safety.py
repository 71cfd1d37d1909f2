"""Loading a model, a checkpoint or a chat template never runs code it carries (docs/safety.md).

- weights load through safetensors, or torch.load(weights_only=True), which refuses pickled objects;
- trust_remote_code is off unless the config sets it;
- chat templates render in transformers' sandboxed Jinja environment.

Every payload below would create a marker file if it ran; each test checks that it did not.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file

import sftlab
from sftlab import TargetSettings, prepare_examples
from sftlab.cli import main
from sftlab.config import SFTConfig
from sftlab.data.chat import CHATML, ChatRenderer
from sftlab.errors import ConfigError, DataError
from sftlab.models import load_model
from tiny import char_tokenizer
from tiny_models import save_tiny_llama

SOURCE = pathlib.Path(sftlab.__file__).parent


class Payload:
    """Unpickling this object writes `marker`: what an attacker's checkpoint would do, harmlessly."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A tiny model and a finished 2-step run with a checkpoint at step 1."""
    root = tmp_path_factory.mktemp("safety")
    model = save_tiny_llama(str(root / "model"), char_tokenizer(CHATML))
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(4)))
    argv = [
        "train",
        "/dev/null",
        f"model={model}",
        f"train_data={data}",
        "max_steps=2",
        "save_steps=1",
        "per_device_train_batch_size=2",
        f"cache_dir={root / 'cache'}",
    ]
    assert main([*argv, f"output_dir={root / 'out'}"]) == 0
    return {"root": root, "model": model, "argv": argv, "checkpoint": str(root / "out" / "checkpoints" / "step-1")}


# --- checkpoints ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["scheduler.pt", "rng-0.pt"])
def test_a_checkpoint_holding_a_pickled_object_is_refused_not_run(run, name, tmp_path, capsys):
    checkpoint = str(tmp_path / "step-1")
    shutil.copytree(run["checkpoint"], checkpoint)
    marker = str(tmp_path / "payload-ran")
    state = torch.load(os.path.join(checkpoint, name), weights_only=True)
    torch.save({"payload": Payload(marker), "state": state}, os.path.join(checkpoint, name))

    code = main([*run["argv"], f"output_dir={tmp_path / 'out'}", f"resume_from_checkpoint={checkpoint}"])
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert code == 2
    assert not os.path.exists(marker)
    assert error == [
        f"error: {os.path.join(checkpoint, name)}: checkpoint file holds objects other than tensors and plain values; "
        "refused to load it (nothing in it was run); found " + error[0].split("; found ", 1)[1]
    ]
    assert (
        "found Unsupported global: GLOBAL exec;" in error[0]
        and "fix: resume only from checkpoints sftlab wrote" in error[0]
    )


def test_checkpoints_hold_only_tensors_and_plain_values(run):
    """What sftlab writes loads under weights_only=True (the resume path), the weight and optimizer
    shards are safetensors, the optimizer's plain values JSON, and there is no pickled DCP index."""
    checkpoint = pathlib.Path(run["checkpoint"])
    for name in ("scheduler.pt", "rng-0.pt"):
        torch.load(checkpoint / name, weights_only=True)
    shard = load_file(checkpoint / "shard-00001-model-00001-of-00001.safetensors")
    assert any(k.startswith("model.") for k in shard) and any(k.startswith("optimizer.state.") for k in shard)
    assert json.loads((checkpoint / "optimizer.json").read_text())
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "optimizer.json",
        "rng-0.pt",
        "scheduler.pt",
        "shard-00001-model-00001-of-00001.safetensors",
        "state.json",
    ]
    final = run["root"] / "out" / "final"
    assert (final / "model.safetensors").is_file()
    assert not list(final.glob("*.bin")) and not list(final.glob("*.pt"))


def test_a_pickled_dcp_index_in_a_checkpoint_is_never_read(run, tmp_path, capsys):
    """torch.distributed.checkpoint's default reader unpickles the folder's `.metadata` file; sftlab
    reads the index from the safetensors headers, so a `.metadata` payload planted there never runs."""
    checkpoint = str(tmp_path / "step-1")
    shutil.copytree(run["checkpoint"], checkpoint)
    marker = str(tmp_path / "payload-ran")
    with open(
        os.path.join(checkpoint, ".metadata"), "wb"
    ) as handle:  # as DCP's FileSystemWriter writes it: pickle.dump
        pickle.dump(Payload(marker), handle)
    code = main([*run["argv"], f"output_dir={tmp_path / 'out'}", f"resume_from_checkpoint={checkpoint}"])
    assert code == 0 and "resumed from" in capsys.readouterr().out
    assert not os.path.exists(marker)


def test_resuming_runs_no_unrestricted_unpickler(run, tmp_path, monkeypatch):
    """While a checkpoint is loaded, pickle's own loaders (what DCP's default reader and
    torch.load(weights_only=False) use) fail; the resume still succeeds, so none of them is on its path."""
    import sftlab.training.loop as loop

    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("an unrestricted unpickler ran while loading a checkpoint")

    real = loop.load_checkpoint

    def load_checkpoint(*args, **kwargs):
        with monkeypatch.context() as patch:
            for name in ("load", "loads"):
                patch.setattr(pickle, name, refuse)
            patch.setattr(pickle, "Unpickler", refuse)  # torch.load(weights_only=False) builds pickle.Unpickler
            return real(*args, **kwargs)

    monkeypatch.setattr(loop, "load_checkpoint", load_checkpoint)
    code = main([*run["argv"], f"output_dir={tmp_path / 'out'}", f"resume_from_checkpoint={run['checkpoint']}"])
    assert code == 0 and calls == []


# --- model weights ---------------------------------------------------------------------------------


def test_pickled_bin_weights_are_refused_not_run(run, tmp_path):
    folder = shutil.copytree(run["model"], tmp_path / "model")
    weights = load_file(str(folder / "model.safetensors"))
    os.remove(folder / "model.safetensors")
    marker = str(tmp_path / "payload-ran")
    torch.save({**weights, "payload": Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(
        ConfigError, match=r"pickled objects other than tensors; refused to load them \(nothing in them was run\)"
    ):
        load_model(str(folder))
    assert not os.path.exists(marker)


# --- remote code -----------------------------------------------------------------------------------


def test_trust_remote_code_is_off_by_default():
    assert SFTConfig.model_fields["trust_remote_code"].default is False
    assert SFTConfig(model="m", train_data="d.jsonl").trust_remote_code is False


@pytest.mark.parametrize("model_type", ["llama", "not-a-known-type"])
def test_code_in_a_model_folder_does_not_run(run, model_type, tmp_path, capsys):
    """A folder whose config points at its own Python code: with a known architecture transformers'
    own class is used; with an unknown one the run stops and names trust_remote_code."""
    folder = shutil.copytree(run["model"], tmp_path / "model")
    marker = tmp_path / "code-ran"
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type=model_type, auto_map={"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"}
    )
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")

    code = main(["train", "/dev/null", f"model={folder}", *run["argv"][3:], f"output_dir={tmp_path / 'out'}"])
    stderr = capsys.readouterr().err
    assert not marker.exists()
    if model_type == "llama":
        assert code == 0
    else:
        assert code == 2
        assert "field 'trust_remote_code': the model needs code from its folder, and trust_remote_code is off" in stderr
        assert "fix: read that code; set trust_remote_code: true only if you trust its author" in stderr


# --- chat templates --------------------------------------------------------------------------------

# Classic server-side template injection payloads; each ends in os.popen if the sandbox let it through.
ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ raise_exception.__globals__['__builtins__']['__import__']('os').popen('touch MARKER') }}",
    "{{ self.__init__.__globals__.__builtins__ }}",
]


@pytest.mark.parametrize("template", ESCAPES)
def test_a_template_cannot_reach_python_internals(template, tmp_path):
    from jinja2.exceptions import SecurityError

    template = template.replace("MARKER", str(tmp_path / "template-ran"))
    renderer = ChatRenderer(char_tokenizer(), template)
    with pytest.raises(SecurityError, match="is unsafe"):
        renderer.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}])
    assert not (tmp_path / "template-ran").exists()


def test_an_unsafe_attribute_renders_as_nothing():
    # Printed on its own, a refused attribute is an empty Undefined: nothing of the function leaks.
    renderer = ChatRenderer(char_tokenizer(), "[{{ raise_exception.__globals__ }}]")
    assert renderer.render([{"role": "user", "content": "hi"}]) == "[]"


def test_a_sandbox_violation_in_the_data_stage_is_a_clear_error():
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    settings = TargetSettings(chat_template="{{ ''.__class__.__mro__ }}")
    with pytest.raises(
        DataError,
        match=r"record 0, field 'chat_template': the chat template failed on this record; "
        r"found SecurityError: access to attribute '__class__' of 'str' object is unsafe",
    ):
        prepare_examples([record], char_tokenizer(), settings, use_cache=False)


# --- the code itself -------------------------------------------------------------------------------


def _calls(name: str) -> list[tuple[str, ast.Call]]:
    found = []
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == name:
                found.append((path.name, node))
    return found


def test_every_torch_load_in_sftlab_is_weights_only():
    calls = _calls("torch.load")
    assert calls, "expected the checkpoint loader"
    for module, call in calls:
        options = {k.arg: ast.unparse(k.value) for k in call.keywords}
        assert options.get("weights_only") == "True", f"{module}: {ast.unparse(call)}"


def test_sharded_checkpoints_are_read_through_safetensors_only():
    """Every torch.distributed.checkpoint load in sftlab names the safetensors reader; DCP's default
    FileSystemReader (a pickled index) appears nowhere."""
    loads = _calls("dcp.load") + _calls("torch.distributed.checkpoint.load")
    assert loads, "expected the checkpoint loader"
    for module, call in loads:
        options = {k.arg: ast.unparse(k.value) for k in call.keywords}
        assert options.get("storage_reader", "").startswith("HuggingFaceStorageReader("), (
            f"{module}: {ast.unparse(call)}"
        )
    for path in SOURCE.rglob("*.py"):
        assert "FileSystemReader" not in path.read_text(), path.name


def test_sftlab_never_unpickles_or_trusts_remote_code_itself():
    for name in ("pickle.load", "pickle.loads", "torch.jit.load", "marshal.loads"):
        assert _calls(name) == [], name
    for module, call in _calls("np.load") + _calls("numpy.load"):  # the preparation cache
        options = {k.arg: ast.unparse(k.value) for k in call.keywords}
        assert options.get("allow_pickle", "False") == "False", f"{module}: {ast.unparse(call)}"
    for path in SOURCE.rglob("*.py"):
        assert "trust_remote_code=True" not in path.read_text(), path.name
