"""DeMe — Decouple-Then-Merge (CVPR 2025): finetune diffusion models as multi-task learning.

The library behind the numbered notebooks: ``config`` (profiles), ``data``, ``models`` (projected UNets),
``timesteps`` (ranges, probabilistic sampling), ``losses``, ``mtl`` (ANT baselines), ``train`` (the one
loop), ``merge``, ``sampling``, ``metrics``, ``analysis`` and ``plots`` (Figs. 1a, 2, 4, 6), ``compare`` (Tables
1–2), ``sd`` (Stable Diffusion), ``stages`` (what the notebooks call), ``cli``.
"""

__version__ = "0.1.0"
