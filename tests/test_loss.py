import math

import numpy as np
import torch
import torch.nn.functional as F

from dino_sparo.loss import DINOLoss, teacher_temperature_schedule, training_signals


def reference_dino_loss(student, teacher, center, ncrops, teacher_temp, student_temp=0.1):
    """DINO's double loop over (teacher global view, student view) pairs, skipping a view with itself."""
    student_views = (student / student_temp).chunk(ncrops)
    teacher_views = F.softmax((teacher - center) / teacher_temp, dim=-1).chunk(2)
    total, terms = 0.0, 0
    for iq, q in enumerate(teacher_views):
        for v in range(ncrops):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(student_views[v], dim=-1), dim=-1).mean()
            terms += 1
    return total / terms


def test_loss_matches_reference_double_loop():
    ncrops, batch, out_dim = 6, 5, 32
    loss_fn = DINOLoss(out_dim, ncrops, 0.04, 0.04, 0, 10).double()
    loss_fn.center.copy_(torch.randn(1, out_dim, dtype=torch.float64) * 0.1)
    student = torch.randn(ncrops * batch, out_dim, dtype=torch.float64)
    teacher = torch.randn(2 * batch, out_dim, dtype=torch.float64)
    expected = reference_dino_loss(student, teacher, loss_fn.center.clone(), ncrops, 0.04)
    assert torch.allclose(loss_fn(student, teacher, epoch=0).double(), expected, rtol=1e-6)
    assert loss_fn.num_pairs == 10


def test_loss_with_two_crops_only():
    batch, out_dim = 4, 8
    loss_fn = DINOLoss(out_dim, 2, 0.04, 0.04, 0, 1)
    student, teacher = torch.randn(2 * batch, out_dim), torch.randn(2 * batch, out_dim)
    # only the cross-view pairs (teacher 0, student 1) and (teacher 1, student 0) count
    t0, t1 = F.softmax(teacher[:batch] / 0.04, -1), F.softmax(teacher[batch:] / 0.04, -1)
    s0, s1 = F.log_softmax(student[:batch] / 0.1, -1), F.log_softmax(student[batch:] / 0.1, -1)
    expected = (-(t0 * s1).sum(-1).mean() - (t1 * s0).sum(-1).mean()) / 2
    assert torch.allclose(loss_fn(student, teacher, 0), expected, atol=1e-6)


def test_center_is_ema_of_teacher_mean_after_the_loss():
    out_dim = 8
    loss_fn = DINOLoss(out_dim, 4, 0.04, 0.04, 0, 10, center_momentum=0.9)
    old_center = torch.randn(1, out_dim)
    loss_fn.center.copy_(old_center)
    student, teacher = torch.randn(4 * 3, out_dim), torch.randn(2 * 3, out_dim)
    expected_loss = reference_dino_loss(student, teacher, old_center, 4, 0.04)  # uses the *old* center
    loss = loss_fn(student, teacher, 0)
    assert torch.allclose(loss, expected_loss, atol=1e-6)
    assert torch.allclose(loss_fn.center, 0.9 * old_center + 0.1 * teacher.mean(dim=0, keepdim=True), atol=1e-6)
    assert "center" in loss_fn.state_dict()


def test_teacher_temperature_warmup_per_epoch():
    schedule = teacher_temperature_schedule(0.04, 0.07, 30, 100)
    assert len(schedule) == 100
    assert math.isclose(schedule[0], 0.04) and math.isclose(schedule[29], 0.07) and math.isclose(schedule[99], 0.07)
    assert np.allclose(schedule[:30], np.linspace(0.04, 0.07, 30))
    loss_fn = DINOLoss(8, 2, 0.04, 0.07, 30, 100)
    assert math.isclose(loss_fn.teacher_temperature(15), 0.04 + 15 * 0.03 / 29)
    # epoch 15's temperature is what the loss uses
    student, teacher = torch.randn(4, 8), torch.randn(4, 8)
    expected = reference_dino_loss(student, teacher, torch.zeros(1, 8), 2, loss_fn.teacher_temperature(15))
    assert torch.allclose(loss_fn(student, teacher, 15), expected, atol=1e-6)


def test_collapsed_teacher_gives_ln_out_dim():
    out_dim, batch = 64, 4
    loss_fn = DINOLoss(out_dim, 4, 0.04, 0.04, 0, 1)
    constant = torch.zeros(2 * batch, out_dim)  # uniform teacher
    loss = loss_fn(torch.zeros(4 * batch, out_dim), constant, 0)
    assert math.isclose(loss.item(), math.log(out_dim), rel_tol=1e-6)


def test_training_signals():
    out_dim, batch, ncrops = 16, 8, 4
    loss_fn = DINOLoss(out_dim, ncrops, 0.04, 0.04, 0, 1)
    teacher = torch.zeros(2 * batch, out_dim)
    teacher[:, 3] = 10.0  # every teacher output picks prototype 3, nearly one-hot
    student = torch.randn(ncrops * batch, out_dim)
    student[: ncrops * batch // 2, 3] = 100.0  # student views 0 and 1 agree with it
    student[ncrops * batch // 2:, 3] = -100.0  # views 2 and 3 do not
    signals = training_signals(loss_fn, student, teacher, 0)
    assert signals["teacher_mode_share"].item() == 1.0
    assert signals["teacher_entropy"].item() < 1e-3
    # pairs (teacher view i, student view v != i): views 0,1 agree; 2,3 do not -> teacher 0 meets (1 agree, 2, 3),
    # teacher 1 meets (0 agree, 2, 3): 2 of 6 pairs agree
    assert math.isclose(signals["agreement"].item(), 2 / 6, rel_tol=1e-6)
    uniform = training_signals(loss_fn, student, torch.zeros(2 * batch, out_dim), 0)
    assert math.isclose(uniform["teacher_entropy"].item(), math.log(out_dim), rel_tol=1e-5)
