"""The "Send to ..." buttons: move an image, and the parameters stored in it, to another tab.

Sources are a results gallery (the image selected in this session's gallery) or the PNG Info tab
(the uploaded file and its parameters). Sending to txt2img or img2img fills every control the
infotext names (through :meth:`GenerationControls.paste`), so "send to" is the same operation as
A1111's paste.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gradio as gr

from app.ui.job_runner import TabSession, read_infotext

if TYPE_CHECKING:
    from app.services import StudioServices
    from app.ui.extras_tab import ExtrasTab
    from app.ui.img2img_tab import Img2ImgTab
    from app.ui.png_info_tab import PngInfoTab
    from app.ui.results_panel import ResultsPanel
    from app.ui.txt2img_tab import Txt2ImgTab

# (image path, infotext) for the picked image, from an event's input dict
SourceReader = Callable[[dict[Any, Any]], tuple[str | None, str]]


@dataclass
class SendTargets:
    """Everything a "send to" can write to; ``talking_head_image`` is None until that tab exists."""

    tabs: Any
    txt2img: Txt2ImgTab
    img2img: Img2ImgTab
    extras: ExtrasTab
    talking_head_image: Any = None

    def outputs(self, target: str) -> set[Any]:
        if target == "txt2img":
            controls = self.txt2img.controls
            return {
                self.tabs,
                *controls.fields.values(),
                controls.checkpoint,
                controls.vae,
                controls.extra_seed,
            }
        if target in ("img2img", "inpaint"):
            tab = self.img2img
            controls = tab.controls
            return {
                self.tabs,
                tab.mode,
                tab.mode_tabs,
                tab.inpaint_options,
                tab.init_image,
                *controls.fields.values(),
                controls.checkpoint,
                controls.vae,
                controls.extra_seed,
            }
        if target == "extras":
            return {self.tabs, self.extras.image, self.extras.mode, self.extras.mode_tabs}
        if target == "talking_head" and self.talking_head_image is not None:
            return {self.tabs, self.talking_head_image}
        return {self.tabs}

    def updates(
        self, services: StudioServices, target: str, path: str | None, infotext: str, with_parameters: bool
    ) -> dict[Any, Any]:
        from pipelines.outputs.infotext import infotext_to_request_fields, parse_infotext

        fields: dict[str, Any] = {}
        if with_parameters and infotext:
            fields = infotext_to_request_fields(parse_infotext(infotext))
        if target == "txt2img":
            if not fields:
                raise gr.Error("This image has no generation parameters to send.", print_exception=False)
            values, notes = self.txt2img.controls.paste(services, fields)
            _warn(notes)
            return {**values, self.tabs: gr.Tabs(selected="txt2img")}
        if path is None:
            raise gr.Error("Pick an image first.", print_exception=False)
        if target in ("img2img", "inpaint"):
            tab = self.img2img
            values, notes = tab.controls.paste(services, fields) if fields else ({}, [])
            _warn(notes)
            values[self.tabs] = gr.Tabs(selected="img2img")
            if target == "img2img":
                values[tab.mode] = target
                values[tab.mode_tabs] = gr.Tabs(selected=target)
                values[tab.inpaint_options] = gr.update(visible=False)
            if target == "img2img":
                values[tab.init_image] = path
            return values  # the inpaint editor is filled by ``editor_value`` once it is visible
        if target == "extras":
            return {
                self.tabs: gr.Tabs(selected="extras"),
                self.extras.image: path,
                self.extras.mode: "single",
                self.extras.mode_tabs: gr.Tabs(selected="single"),
            }
        if target == "talking_head" and self.talking_head_image is not None:
            return {self.tabs: gr.Tabs(selected="talking_head"), self.talking_head_image: path}
        return {self.tabs: gr.Tabs(selected=target)}


def _warn(notes: list[str]) -> None:
    for note in notes:
        gr.Warning(note)


def gallery_source(panel: ResultsPanel) -> SourceReader:
    def read(data: dict[Any, Any]) -> tuple[str | None, str]:
        session: TabSession = data[panel.state]
        chosen = session.selected_image()
        if chosen is None:
            return None, ""
        return chosen.path, chosen.infotext or read_infotext(chosen.path)

    return read


def wire_button(
    services: StudioServices,
    targets: SendTargets,
    button: Any,
    target: str,
    inputs: set[Any],
    source: SourceReader,
    *,
    with_parameters: bool = True,
) -> None:
    def send(data: dict[Any, Any]) -> dict[Any, Any]:
        path, infotext = source(data)
        return targets.updates(services, target, path, infotext, with_parameters)

    event = button.click(
        send, inputs=inputs, outputs=targets.outputs(target), show_progress="hidden", concurrency_limit=None
    )
    if target == "inpaint":
        # Gradio's image editor sets up its canvas when its tab is opened by a click; selecting
        # the tab from Python leaves it zero-sized. So: click the Inpaint sub-tab in the browser,
        # then give the editor its image.
        def editor_value(data: dict[Any, Any]) -> Any:
            path, _ = source(data)
            return {"background": path, "layers": [], "composite": path}

        event.success(None, js=_click_subtab_js("img2img_mode_tabs", "Inpaint")).success(
            editor_value,
            inputs=inputs,
            outputs=targets.img2img.inpaint,
            show_progress="hidden",
            concurrency_limit=None,
        )


def _click_subtab_js(tabs_id: str, label: str) -> str:
    return (
        f"() => {{ const tab = [...document.querySelectorAll('#{tabs_id} [role=tab]')]"
        f".find((b) => b.innerText.trim() === {label!r}); if (tab) tab.click(); }}"
    )


def wire(services: StudioServices, targets: SendTargets, png_info: PngInfoTab) -> None:
    """Connect every gallery's and PNG Info's send buttons to their target tabs."""
    for panel in (targets.txt2img.panel, targets.img2img.panel, targets.extras.panel):
        for target, button in panel.send_buttons.items():
            if target == "talking_head" and targets.talking_head_image is None:
                button.visible = False
                continue
            # extras results carry no generation parameters worth pasting
            with_parameters = panel is not targets.extras.panel
            wire_button(
                services,
                targets,
                button,
                target,
                {panel.state},
                gallery_source(panel),
                with_parameters=with_parameters,
            )

    def png_source(data: dict[Any, Any]) -> tuple[str | None, str]:
        return data[png_info.image], data[png_info.parameters] or ""

    for target, button in png_info.send_buttons.items():
        wire_button(services, targets, button, target, {png_info.image, png_info.parameters}, png_source)
