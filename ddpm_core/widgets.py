"""Sliders for the notebooks: pick a timestep (or a reverse step) and see a figure redrawn.

This module owns the interactive controls only; the figures come from `ddpm_core.plotting`.
In JupyterLab the slider redraws the figure. Run headless (papermill, nbval) a widget has no
frontend, so it shows its initial state; the notebooks therefore also draw the same figure
for a few fixed values, so that they read well without a kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import ipywidgets
from IPython.display import display
from matplotlib.figure import Figure


def figure_slider(draw: Callable[[int], Figure], values: Sequence[int], description: str = "t",
                  value: int | None = None) -> ipywidgets.Widget:
    """A slider over `values` (e.g. timesteps) and the figure `draw(value)` under it, redrawn
    on every move. Returns the widget; display it as the last expression of a cell."""
    values = list(values)
    if not values:
        raise ValueError("figure_slider needs at least one value to slide over")
    value = values[0] if value is None else value
    if value not in values:
        raise ValueError(f"the initial value {value} is not one of the slider's values")
    slider = ipywidgets.SelectionSlider(options=values, value=value, description=description,
                                        continuous_update=False)
    output = ipywidgets.Output()

    def redraw(change=None) -> None:
        with output:
            output.clear_output(wait=True)
            display(draw(slider.value))

    slider.observe(redraw, names="value")
    redraw()
    return ipywidgets.VBox([slider, output])
