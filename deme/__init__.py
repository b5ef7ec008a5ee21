"""DeMe — Decouple-Then-Merge (CVPR 2025): finetune diffusion models as multi-task learning.

The library behind the numbered notebooks, one concern per module:

* settings and data: ``config`` (profiles), ``methods`` (the objectives' registry), ``data`` (the dataset
  registry), ``imagecaptions`` (image–caption folders, evaluation prompts), ``errors``;
* the method: ``models`` (projected UNets), ``timesteps`` (ranges, probabilistic sampling), ``losses``,
  ``objectives`` and ``mtl`` (the baselines' objectives), ``train`` (the one loop), ``merge``, ``sampling``;
* Stable Diffusion: ``sd`` (pipeline, latent batches, generation), ``sdeval`` (FID@256, CLIP score);
* evaluation: ``heldout`` (the paired held-out loss), ``metrics`` (FID/KID, CLIP), ``paired`` (paired
  differences), ``classifier`` (the alignment stand-in), ``compare`` (Tables 1–2), ``ablation`` (Table 3, sweeps);
* analyses and figures: ``analysis`` (Figs. 1a, 2), ``weightspace`` (Figs. 4, 6), ``plots``;
* running it: ``stages`` (what the notebooks call), ``runs`` (run folders, records), ``reproduce`` (the notebooks
  in order), ``distributed`` (sharding over processes), ``rehearse`` (paper profiles on stand-ins), ``cli``.
"""

__version__ = "0.1.0"
