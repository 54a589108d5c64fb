"""``python -m experiments.charrnn export --to torch``: the README's PyTorch script loads the
file and gives jaxseq's next-character log-probabilities."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import charrnn as cli
from jaxseq import charrnn
from jaxseq import checkpoint as ckpt
from jaxseq.charrnn import CharRNNConfig
from jaxseq.data import CharVocab

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"


def readme_torch_script() -> str:
    """The README's PyTorch loading script (a ``py`` block: it needs an exported file, so
    tests/test_readme.py, which runs the ``python`` blocks, leaves it to this test)."""
    blocks = [
        b
        for b in re.findall(r"```py\n(.*?)```", README.read_text(), flags=re.S)
        if "torch.load" in b
    ]
    assert len(blocks) == 1
    code = blocks[0]
    assert len([line for line in code.splitlines() if line.strip()]) <= 16
    return code


def write_checkpoint(run_dir, **config_fields):
    """A char-RNN checkpoint whose params (biases included) are all clearly non-zero."""
    config = CharRNNConfig(hidden=8, embed=5, layers=2, batch=2, seq=4, **config_fields)
    vocab = CharVocab.from_text(TEXT)
    model = charrnn.build_model(config, vocab.size)
    state = charrnn.init_state(config, model, charrnn.make_optimizer(config))
    leaves, treedef = jax.tree.flatten(state.params)
    rng = np.random.default_rng(0)
    params = treedef.unflatten(
        [a + jnp.asarray(0.3 * rng.standard_normal(a.shape), a.dtype) for a in leaves]
    )
    state = state._replace(params=params)
    ckpt.save(run_dir, jax.device_get(state), charrnn.checkpoint_meta(config, vocab, 7))
    return model, params, vocab


@pytest.mark.parametrize(
    "cell,input_mode", [("gru", "embedding"), ("lstm", "embedding"), ("rnn", "onehot")]
)
def test_export_to_torch_loads_in_the_readme_script(
    tmp_path, cell, input_mode, capsys, monkeypatch
):
    torch = pytest.importorskip("torch", reason="export --to torch needs PyTorch")
    model, params, vocab = write_checkpoint(tmp_path / "run", cell=cell, input=input_mode)
    out = tmp_path / "model.pt"
    assert (
        cli.main(["export", "--checkpoint", str(tmp_path / "run"), "--to", "torch", str(out)]) == 0
    )
    assert "wrote" in capsys.readouterr().err

    script = readme_torch_script()
    assert '"shakespeare.pt"' in script
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace = {}
    exec(
        compile(script.replace('"shakespeare.pt"', repr(str(out))), str(README), "exec"), namespace
    )
    assert len(namespace["text"]) > 0 and set(namespace["text"]) <= set(vocab.chars)

    m = namespace["m"]
    ids = np.asarray(vocab.encode(TEXT[:20]))
    with torch.no_grad():
        ys, _ = m["rnn"](m["embed"](torch.from_numpy(ids[:, None]).long()))
        torch_logp = torch.log_softmax(m["out"](ys), -1)[:, 0].numpy()
    _, logits = model.apply(params, model.initial_carry((1,)), jnp.asarray(ids[:, None]))
    logp = np.asarray(jax.nn.log_softmax(logits, -1))[:, 0]
    np.testing.assert_allclose(torch_logp, logp, atol=1e-4, rtol=0)


def test_export_errors(tmp_path, capsys, monkeypatch):
    import builtins

    from experiments import _cli

    code = _cli.run_main(
        cli.main,
        ["export", "--checkpoint", str(tmp_path / "none"), "--to", "torch", str(tmp_path / "x.pt")],
    )
    err = capsys.readouterr().err
    if "needs PyTorch" not in err:
        assert code == 2 and "checkpoint not found" in err
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    code = _cli.run_main(
        cli.main, ["export", "--checkpoint", str(tmp_path), "--to", "torch", str(tmp_path / "x.pt")]
    )
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "error: --to torch needs PyTorch (pip install torch)"
    )
