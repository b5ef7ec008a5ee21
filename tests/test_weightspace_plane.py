"""Fig. 6a's grid widened until it holds its lowest point (deme.weightspace.plane_around_minimum)."""
import numpy as np

from deme import weightspace as W


def _planted(monkeypatch, a0, b0):
    calls = []

    def loss(base, ea, eb, cfg, images, labels, coords, **kw):
        a, b = W.grid_coords(coords)
        calls.append(len(a) * len(b))
        return (a[:, None] - a0) ** 2 + (b[None, :] - b0) ** 2 + 1.0

    monkeypatch.setattr(W, "task_vector_plane_loss", loss)
    return calls


def test_a_minimum_beyond_the_edge_is_brought_inside_computing_only_the_new_points(monkeypatch):
    calls = _planted(monkeypatch, 2.2, 0.3)
    coords = np.linspace(-0.5, 1.5, 5)
    plane, (a, b), inside = W.plane_around_minimum(None, None, None, None, None, None, coords)
    assert inside
    np.testing.assert_allclose(a, [-0.5, 0, 0.5, 1, 1.5, 2, 2.5])                 # two points added, same spacing
    np.testing.assert_allclose(b, coords)
    np.testing.assert_allclose(plane, (a[:, None] - 2.2) ** 2 + (b[None, :] - 0.3) ** 2 + 1.0)
    i, j = np.unravel_index(np.argmin(plane), plane.shape)
    assert (a[i], b[j]) == (2.0, 0.5)
    assert calls == [25, 10]                                                         # the 5x5 grid, then 2x5 new


def test_a_corner_minimum_widens_both_axes_and_an_unreachable_one_is_reported(monkeypatch):
    _planted(monkeypatch, -1.2, 2.1)
    plane, (a, b), inside = W.plane_around_minimum(None, None, None, None, None, None, np.linspace(-0.5, 1.5, 5))
    assert inside and a[0] < -1.2 < a[-1] and b[0] < 2.1 < b[-1] and plane.shape == (len(a), len(b))
    _planted(monkeypatch, 50.0, 0.0)
    plane, (a, b), inside = W.plane_around_minimum(None, None, None, None, None, None, np.linspace(-0.5, 1.5, 5),
                                                   max_extensions=2)
    assert not inside and len(a) == 10 and a[-1] == 4.0         # 5 → 7 → 10 points (half the grid each time), stop


def test_an_interior_minimum_computes_the_grid_once(monkeypatch):
    calls = _planted(monkeypatch, 0.4, 0.6)
    plane, (a, b), inside = W.plane_around_minimum(None, None, None, None, None, None, np.linspace(-0.5, 1.5, 5))
    assert inside and calls == [25] and len(a) == 5
