"""Looking: figures from data frames and arrays, and boundaries on real photos.

- `plots`: every figure the notebooks and results show, saved one way (`save_figure`); drawing only;
- `viz`: tracing many images, alignment of boundaries with COCO object outlines, overlays on disk.

Command line: `python -m dtplib.viz`.
"""

__all__ = ["plots", "viz"]
