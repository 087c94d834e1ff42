import pytest
import torch

from calbench.prompts import PromptLearner

CLASSNAMES = ["adipose tissue", "lymphocytes", "cancer-associated stroma", "debris"]


@pytest.mark.parametrize("class_specific", [False, True])
def test_ctx_init_reproduces_the_hand_prompt(tiny, class_specific):
    learner = PromptLearner(tiny, CLASSNAMES, ctx_init="a photo of a", class_specific=class_specific)
    assert learner.n_ctx == 4
    reference = tiny.encode_texts([f"a photo of a {c}." for c in CLASSNAMES])
    torch.testing.assert_close(learner.text_features(), reference, atol=1e-5, rtol=0)


def test_random_context_is_seeded_and_trainable(tiny):
    a = PromptLearner(tiny, CLASSNAMES, n_ctx=16, seed=3)
    b = PromptLearner(tiny, CLASSNAMES, n_ctx=16, seed=3)
    assert a.ctx.shape == (16, tiny.embed_dim)
    torch.testing.assert_close(a.ctx, b.ctx, atol=0, rtol=0)
    assert 0.01 < float(a.ctx.detach().std()) < 0.03  # CoOp's N(0, 0.02^2)
    a.text_features().sum().backward()
    assert a.ctx.grad is not None and a.ctx.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in tiny.model.parameters())


def test_class_specific_context_has_one_set_per_class(tiny):
    learner = PromptLearner(tiny, CLASSNAMES, n_ctx=8, class_specific=True, seed=0)
    assert learner.ctx.shape == (len(CLASSNAMES), 8, tiny.embed_dim)
    assert learner.text_features().shape == (len(CLASSNAMES), tiny.embed_dim)


def test_cutting_tokens_after_eot_leaves_features_unchanged(tiny):
    """The causal text tower pools at EOT, so the truncated sequence must give the same features."""
    prompts = [f"a photo of a {c}." for c in CLASSNAMES]
    tokens = tiny.tokenize(prompts)
    assert tokens.ids.shape[1] == int(tokens.eot.max()) + 1 < 77
    full_ids = tiny.tokenizer(prompts)
    full = tiny.encode_embeddings(tiny.embed_tokens(full_ids), type(tokens)(full_ids, tokens.eot))
    cut = tiny.encode_embeddings(tiny.embed_tokens(tokens.ids), tokens)
    torch.testing.assert_close(cut, full, atol=1e-5, rtol=0)


def _saved(tiny, tmp_path, **tensors):
    """A prompt file of a 4-token context on ``tiny`` whose tensors are replaced by ``tensors``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from calbench.prompts import save_prompt

    path = tmp_path / "p.safetensors"
    save_prompt(path, PromptLearner(tiny, CLASSNAMES, n_ctx=4, seed=0), {})
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file(tensors, str(path), meta)
    return path


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"ctx": torch.zeros(4, 5)}, r"context of shape \(4, 5\), but its model and settings need \(4, 128\)"),
        ({"ctx": torch.zeros(128)}, r"context of shape \(128,\), but .* need \(4, 128\)"),  # copy_ would broadcast it
        ({"ctx": torch.zeros(2, 128)}, r"context of shape \(2, 128\)"),
        ({"ctx": torch.zeros(3, 4, 128)}, r"context of shape \(3, 4, 128\)"),
        ({"other": torch.zeros(4, 128)}, r"holds no learned context \(tensor 'ctx'\)"),
        ({"ctx": torch.full((4, 128), float("nan"))}, "holds a context that is not finite numbers"),
        ({"ctx": torch.full((4, 128), float("inf"))}, "holds a context that is not finite numbers"),
    ],
)
def test_a_damaged_context_is_refused_with_one_line(tiny, tmp_path, tensors, message):
    from calbench.errors import CalbenchError
    from calbench.prompts import load_prompt

    with pytest.raises(CalbenchError, match=message):
        load_prompt(_saved(tiny, tmp_path, **tensors), tiny)
    assert load_prompt(_saved(tiny, tmp_path, ctx=torch.ones(4, 128)), tiny).ctx.sum() == 4 * 128
