"""Looking: figures from data frames and arrays, and boundaries on real photos.

- `plots`: the style, the one way of saving (`save_figure`), and the figures of data, boundaries and training runs;
- `compare`: figures that compare models (speed-up, accuracy against cost); drawing only, as `plots`;
- `viz`: tracing many images, alignment of boundaries with COCO object outlines, overlays on disk.

Command line: `python -m dtplib.viz`.
"""

__all__ = ["compare", "plots", "viz"]
