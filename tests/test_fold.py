"""Task-indexed BatchNorms fold the mask of the layer before them into their affine. In an eager
training forward, the norms of one config do it together, in one ``FoldAffine`` node (a few
multi-tensor ops for all of them). Its gradients must be those of the per-norm products that a
forward with per-sample task ids still takes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_per_sample import IDS, _images, _trained


def _nodes(loss: torch.Tensor, name: str) -> int:
    seen, stack, count = set(), [loss.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += type(node).__name__ == name
        stack.extend(n for n, _ in node.next_functions)
    return count


def _grads(model, loss):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n: g for (n, _), g in zip(named, got)}


@pytest.mark.parametrize("name", ["payload-cnn-bn", "converted-cnn-bn", "converted-resnet", "hat_resnet18s"])
def test_the_folded_affines_of_all_norms_take_one_node_with_the_gradients_of_one_product_each(digit_tasks, name):
    model, run, shape, _ = _trained(name, digit_tasks)
    reference = copy.deepcopy(model)
    x = _images(digit_tasks, len(IDS), **shape)
    y = torch.randint(0, 2, (len(IDS),), generator=torch.Generator().manual_seed(5))
    model.train()
    reference.train()
    loss = F.cross_entropy(run(model, x, 1, 30.0).flatten(1)[:, :2], y)
    # every sample of task 1 given as a per-sample id: each norm folds its own mask (two products)
    ids = torch.ones(len(IDS), dtype=torch.long)
    loss_ref = F.cross_entropy(run(reference, x, ids, 30.0).flatten(1)[:, :2], y)
    assert _nodes(loss, "FoldAffineBackward") == 1  # every norm of the model, one node
    assert _nodes(loss_ref, "FoldAffineBackward") == 0
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=1e-6)
    got, want = _grads(model, loss), _grads(reference, loss_ref)
    for n in got:
        if want[n] is None:
            assert got[n] is None or not got[n].any(), n
        else:
            torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("change", ["double", "data assignment", "load_state_dict"])
def test_rows_read_without_a_select_follow_a_cast_a_new_storage_and_a_load(digit_tasks, change):
    """The mask and fold nodes read each task row through a view kept between forwards; a cast,
    a ``.data`` assignment (new storage) and a load (in place) must reach them."""
    model, run, shape, _ = _trained("converted-cnn-bn", digit_tasks)
    x = _images(digit_tasks, len(IDS), **shape)
    model.train()
    run(model, x, 1, 30.0)  # the views of this task's rows are kept now
    fresh = copy.deepcopy(model)  # keeps no views
    for m in (model, fresh):
        if change == "double":
            m.double()
        elif change == "data assignment":
            with torch.no_grad():
                for p in m.parameters():
                    p.data = p.data * 1.5 + 0.25
    if change == "load_state_dict":
        state = {k: v * 1.5 + 0.25 if v.is_floating_point() else v for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        fresh.load_state_dict(state)
    xs = x.double() if change == "double" else x
    out, ref = run(model, xs, 1, 30.0), run(fresh, xs, 1, 30.0)
    assert torch.equal(out, ref)
    got, want = _grads(model, out.sum()), _grads(fresh, ref.sum())
    for n in got:
        assert (got[n] is None and want[n] is None) or torch.equal(got[n], want[n]), n


def test_row_gradients_equal_select_backward_for_every_parameter():
    """The gradients the mask and fold nodes give task-indexed parameters: zero but for the row
    of the task, as torch's select_backward makes them, from one shared buffer."""
    from hat.masks.gate import row_gradients

    g = torch.Generator().manual_seed(0)
    # parameters of one shape share a part of the buffer (one unbind), in any order among others
    shapes = [torch.Size((4, 3)), torch.Size((6, 5)), torch.Size((4, 3)), torch.Size((3, 2, 2)), torch.Size((5, 7)),
              torch.Size((4, 3)), torch.Size((6, 5))]
    slots = [1, 5, 0, 2, 4, 3, 0]
    rows = [torch.randn(s[1:], generator=g) for s in shapes]
    for given in (rows, [None if i == 2 else r for i, r in enumerate(rows)],  # None: a row that got no gradient
                  torch.cat([r.flatten() for r in rows])):  # or every row, concatenated
        got = row_gradients(given, shapes, slots)
        for i, (r, shape, slot, out) in enumerate(zip(rows, shapes, slots, got)):
            if isinstance(given, list) and given[i] is None:
                assert out is None
            else:
                assert out.shape == shape and out.is_contiguous()
                assert torch.equal(out, torch.ops.aten.select_backward(r, shape, 0, slot)), i


def test_a_norm_parameter_changed_in_place_before_the_backward_is_an_error_as_in_autograd(digit_tasks):
    model, run, shape, _ = _trained("converted-cnn-bn", digit_tasks)
    x = _images(digit_tasks, len(IDS), **shape)
    model.train()
    out = run(model, x, 1, 30.0)
    norm = next(m for m in model.modules() if hasattr(m, "running_mean"))
    with torch.no_grad():
        norm.weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()
    out = run(model, x, 1, 30.0)  # a new forward reads the new values
    out.sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad[1].any()
