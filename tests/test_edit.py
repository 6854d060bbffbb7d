"""The one-fact front door: ``python -m editlab.edit`` and ``editlab.edit(...)``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import editlab
from editlab.data.records import RecordError
from editlab.methods.base import Edit, Editor
from editlab.methods.ft import FTL
from editlab.evaluation.teacher_forced import score_pairs

from conftest import assert_state_equal, state_copy

ROOT = Path(__file__).resolve().parent.parent
FACT = dict(prompt="The capital of France is", subject="France", target="Rome", target_true="Paris")
PROBE = "The French capital city is"
FT = ["method.layers=[1]", "method.lr=0.05", "method.num_steps=50"]
# ROME without the second-moment statistics (no corpus pass) and with two short templates
ROME = ["method.layers=[1]", "method.mom2_adjustment=false", "method.context_template_length_params=[[5,2]]",
        "method.template_prompts=[The]", "method.v_num_grad_steps=10"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITLAB_CACHE", str(tmp_path / "cache"))


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "editlab.edit", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _p_new(bundle, prompt=FACT["prompt"], target=FACT["target"]) -> float:
    s = score_pairs(bundle.model, bundle.tokenizer, [prompt], [target])
    return float(torch.exp(-s.nll[0] * s.mask[0].sum()))


# ------------------------------------------------------------------------------ command line
@pytest.mark.parametrize("method, settings", [("ft", FT), ("rome", ROME)])
def test_cli_prints_answers_and_probabilities_before_and_after(tmp_path, method, settings):
    fact = [f"{k}={v}" for k, v in FACT.items()]
    out = _cli("model=tiny_llama", f"method={method}", *settings, *fact, f'probes=["{PROBE}"]', cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(("FTL on tiny-llama", "ROME on tiny-llama")) and "1 fact edited" in lines[0]
    assert "fact 0: The capital of France is → Rome (was Paris)" in out.stdout
    header = next(line for line in lines if "prompt" in line and "before" in line)
    assert "after" in header and "P(Rome) before → after" in header and "P(Paris) before → after" in header
    edit_row = next(line for line in lines if line.strip().startswith("edit "))
    probe_row = next(line for line in lines if line.strip().startswith("probe "))
    assert FACT["prompt"] in edit_row and PROBE in probe_row
    p_new, p_true = re.findall(r"(\S+) → (\S+)", edit_row)
    if method == "ft":  # FT-L at the prompt's last token: the new target's probability rises
        assert float(p_new[1]) > float(p_new[0])
    assert all(0 <= float(p) <= 1 for p in (*p_new, *p_true))
    assert {p.name for p in tmp_path.iterdir()} <= {"cache"}, "nothing written without save= (cache: templates)"


def test_cli_facts_file_and_save(tmp_path):
    facts = [dict(FACT, probes=[PROBE]),
             dict(prompt="Toko Yasuda plays the", subject="Toko Yasuda", target="piano")]
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(facts), encoding="utf-8")
    out = _cli("model=tiny_llama", "method=ft", *FT, f"facts={path}", "--save", str(tmp_path / "edited"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "2 facts edited" in out.stdout and "fact 1: Toko Yasuda plays the → piano   [subject: Toko Yasuda]" in out.stdout
    assert (tmp_path / "edited" / "model.safetensors").is_file()
    info = json.loads((tmp_path / "edited" / "editlab_edit.json").read_text())
    assert info["editor"] == "FTL" and info["method"]["lr"] == 0.05 and len(info["rows"]) == 3


def test_cli_bad_input_is_one_line_naming_the_field(tmp_path):
    out = _cli("model=tiny_llama", "method=ft", "prompt=The capital of France is", "subject=Spain", "target=Rome",
               cwd=tmp_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip() == ("editlab.edit: fact, field 'subject': 'Spain' does not occur in the prompt "
                                  "'The capital of France is'; give it as the prompt spells it")


def test_cli_bad_hyperparameter_is_one_line_naming_its_config_key(tmp_path):
    out = _cli("model=tiny_llama", "method=ft", "method.lr=-1", "prompt=The capital of France is",
               "subject=France", "target=Rome", cwd=tmp_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip() == "editlab.edit: method.lr must be > 0, got -1"


def test_inline_facts_compose_from_overrides():
    from omegaconf import OmegaConf

    cfg = editlab.edit.compose("tiny_llama", "ft", [
        'facts=[{prompt: "The capital of France is", subject: France, target: Rome, probes: ["Where is Paris?"]},'
        ' {prompt: "Toko Yasuda plays the", subject: "Toko Yasuda", target: piano}]'])
    facts = editlab.edit.load_facts(facts=OmegaConf.to_container(cfg.facts))
    assert [(f.record.prompt, f.record.subject, f.record.target_new, f.probes) for f in facts] == [
        ("The capital of France is", "France", "Rome", ("Where is Paris?",)),
        ("Toko Yasuda plays the", "Toko Yasuda", "piano", ())]
    assert [f.record.index for f in facts] == [0, 1]


def test_help_lists_usage_and_configs(capsys):
    editlab.edit.main(["--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m editlab.edit")
    assert "ckpt_path=PATH" in text and "save=DIR" in text
    configs = dict(line.split(": ", 1) for line in text.splitlines() if line.startswith(("model configs", "method configs")))
    assert "tiny_llama" in configs["model configs"].strip().split(", ")
    assert {"rome", "ft", "mend"} <= set(configs["method configs"].strip().split(", "))


# ----------------------------------------------------------------------------------- Python
def test_python_api_edits_inside_the_block_and_restores_bit_exactly(tiny):
    bundle = tiny("llama")
    original = state_copy(bundle.model)
    p0 = _p_new(bundle)
    editor = FTL(layers=[1], lr=0.05, num_steps=50)
    with editlab.edit(**FACT, probes=[PROBE], model=bundle, method=editor) as edited:
        assert edited.model is bundle.model and edited.editor is editor
        p1 = _p_new(bundle)
        assert p1 > p0, "the edit is applied inside the block"
        (name,) = edited.session.deltas
        assert not torch.equal(bundle.model.state_dict()[name], original[name])
        first, probe = edited.rows
        assert (first.kind, first.prompt, probe.kind, probe.prompt) == ("edit", FACT["prompt"], "probe", PROBE)
        assert first.p_new_before == pytest.approx(p0, rel=1e-4) and first.p_new_after == pytest.approx(p1, rel=1e-4)
        assert first.p_true_before is not None and first.p_true_after is not None
        assert "fact 0: The capital of France is → Rome (was Paris)" in edited.table()
    assert_state_equal(bundle.model, original)


def test_python_api_restores_when_the_block_raises(tiny):
    bundle = tiny("llama")
    original = state_copy(bundle.model)
    with pytest.raises(KeyError):
        with editlab.edit(**FACT, model=bundle, method=FTL(layers=[1], lr=0.05, num_steps=5)):
            raise KeyError("inside")
    assert_state_equal(bundle.model, original)


def test_python_api_from_config_names_with_rome(tiny):
    with editlab.edit(**FACT, model="tiny_llama", method="rome", overrides=ROME) as edited:
        assert type(edited.editor).__name__ == "ROME" and edited.editor.layers == [1]
        assert edited.bundle.name == "tiny-llama"
        (name,) = edited.session.deltas
        assert name.endswith("layers.1.mlp.down_proj.weight")
        assert edited.method_config["mom2_adjustment"] is False
        assert not torch.equal(edited.bundle.model.state_dict()[name], tiny("llama").model.state_dict()[name])
    # the config built its own tiny_llama (seed 0): restored, it equals the fixture's, bit for bit
    assert edited.bundle.model is not tiny("llama").model
    assert_state_equal(edited.bundle.model, tiny("llama").model.state_dict())


def test_save_writes_safetensors_that_load_back_equal(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bundle = tiny("llama")
    with editlab.edit(**FACT, model=bundle, method=FTL(layers=[1], lr=0.05, num_steps=20)) as edited:
        inside = state_copy(bundle.model)
        target = edited.save(tmp_path / "edited")
    assert (target / "model.safetensors").is_file() and (target / "config.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(target)
    assert_state_equal(loaded, inside)
    assert AutoTokenizer.from_pretrained(target)("Rome")["input_ids"] == bundle.tokenizer("Rome")["input_ids"]
    assert json.loads((target / "editlab_edit.json").read_text())["facts"][0]["target"] == "Rome"
    with pytest.raises(ValueError, match="save: .* not an empty directory"):
        with editlab.edit(**FACT, model=bundle, method=FTL(layers=[1]), save=target):
            pass


def test_trained_editor_from_ckpt_path(tiny, tmp_path):
    """``ckpt_path``: the editor is rebuilt from the config stored in a checkpoint written by the
    training module (here its checkpoint hook on an untrained MEND, without the normalisation that
    needs training: the format is tested, not the training)."""
    import hydra
    from omegaconf import OmegaConf

    from editlab.lit.editor_train import EditorTrainModule

    bundle = tiny("llama")
    config = OmegaConf.to_container(editlab.edit.compose("tiny_llama", "mend", ["method.rank=4", "method.norm=false"]).method)
    module = EditorTrainModule(bundle, hydra.utils.instantiate(config), lr=1e-3, editor_config=config)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    path = tmp_path / "mend.ckpt"
    torch.save(checkpoint, path)
    original = state_copy(bundle.model)
    with editlab.edit(**FACT, model=bundle, ckpt_path=str(path)) as edited:
        assert type(edited.editor).__name__ == "MEND" and not edited.editor.training
        assert edited.session.deltas and edited.method_config is None
        assert any(not torch.equal(bundle.model.state_dict()[k], original[k]) for k in edited.session.deltas)
    assert_state_equal(bundle.model, original)
    with pytest.raises(ValueError, match="trained for base model 'tiny-llama'"):
        with editlab.edit(**FACT, model=tiny("gpt2"), ckpt_path=str(path)):
            pass


class _PatchEditor(Editor):
    """Adds a zero module beside the first MLP: an edit that is not in the weights."""

    def compute_edit(self, model, tokenizer, records):
        width = model.config.hidden_size
        patch = nn.Linear(width, width, bias=False)
        nn.init.zeros_(patch.weight)
        return Edit(patches={"model.layers.0.mlp": patch})


def test_save_refuses_edits_outside_the_weights(tiny, tmp_path):
    bundle = tiny("llama")
    with editlab.edit(**FACT, model=bundle, method=_PatchEditor()) as edited:
        with pytest.raises(ValueError, match="_PatchEditor keeps its edit as modules added to the model"):
            edited.save(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("change, field", [
    ({"target": ""}, "target"),
    ({"target": "   "}, "target"),
    ({"prompt": None}, "prompt"),
    ({"subject": "Spain"}, "subject"),
    ({"target": 1990}, "target"),
    ({"target_true": ""}, "target_true"),
    ({"probes": ["ok", ""]}, r"probes\[1\]"),
])
def test_bad_fact_names_the_field(change, field):
    with pytest.raises(RecordError, match=rf"field '{field}'"):
        editlab.edit(**{**FACT, **change}, model="tiny_llama", method="ft")


def test_bad_facts_list_names_the_record_and_field(tmp_path):
    facts = [dict(FACT), dict(FACT, colour="red")]
    with pytest.raises(RecordError, match=r"facts, record 1, field 'colour': unknown field"):
        editlab.edit(facts=facts, model="tiny_llama", method="ft")
    path = tmp_path / "facts.json"
    path.write_text(json.dumps([dict(FACT), dict(FACT, subject="")]), encoding="utf-8")
    with pytest.raises(RecordError, match=rf"{re.escape(str(path))}, record 1, field 'subject'"):
        editlab.edit(facts=path, model="tiny_llama", method="ft")
    with pytest.raises(ValueError, match="facts: no such file"):
        editlab.edit(facts=tmp_path / "missing.json", model="tiny_llama", method="ft")
    bad = tmp_path / "bad.json"
    for content, message in ((b"[\xff\xfe]", "is not UTF-8 text"), (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
                             (b"[" + b"9" * 5000 + b"]", "cannot be read as facts")):
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=message):
            editlab.edit(facts=bad, model="tiny_llama", method="ft")


@pytest.mark.parametrize("kwargs, message", [
    (dict(FACT, facts=[FACT]), "give one fact .* or facts=, not both"),
    ({}, "no fact to edit"),
    (dict(FACT), "no method"),
    (dict(FACT, method="mend"), "MEND is a trained editor: pass ckpt_path="),
    (dict(FACT, method="ft", ckpt_path="/nonexistent/editor.ckpt"), "give method= or ckpt_path=, not both"),
    (dict(FACT, ckpt_path="/nonexistent/editor.ckpt"), "ckpt_path: no such file"),
    (dict(FACT, method="ft", max_new_tokens=0), "max_new_tokens must be a positive integer"),
])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        with editlab.edit(**{"model": "tiny_llama", **kwargs}):
            pass


# ------------------------------------------------------------------------ the name editlab.edit
def test_editlab_edit_is_the_module_and_calls_the_function():
    import editlab.edit as module

    assert editlab.edit is module and callable(module)
    assert module.edit is not module and module.edit.__module__ == "editlab.edit"
    from editlab import edit

    assert edit is module


def test_import_editlab_is_cheap_and_edit_loads_on_first_use():
    code = ("import sys, editlab; assert 'editlab.edit' not in sys.modules and 'torch' not in sys.modules; "
            "f = editlab.edit; assert callable(f) and sys.modules['editlab.edit'] is f; print('ok')")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
