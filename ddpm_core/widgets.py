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
    return figure_controls(lambda value: draw(value), value=slider)


def figure_controls(draw: Callable[..., Figure], **controls: ipywidgets.ValueWidget) -> ipywidgets.Widget:
    """Controls (named widgets, e.g. a digit dropdown and a scale slider) above the figure
    `draw(**their values)`, redrawn when any of them changes."""
    if not controls:
        raise ValueError("figure_controls needs at least one control")
    output = ipywidgets.Output()

    def redraw(change=None) -> None:
        with output:
            output.clear_output(wait=True)
            display(draw(**{name: widget.value for name, widget in controls.items()}))

    for widget in controls.values():
        widget.observe(redraw, names="value")
    redraw()
    return ipywidgets.VBox([ipywidgets.HBox(list(controls.values())), output])
