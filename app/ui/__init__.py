"""The Gradio UI: one module per tab, each exporting ``build(services)``.

Tabs, in A1111's order: txt2img, img2img, Extras, PNG Info, Image Browser, Talking head, Presets,
Settings, Queue. The
tabs share no per-user data: each keeps its own ``gr.State``; what they share is the studio
(``services``: settings, models, the job queue). ``build_ui`` then connects the "send to"
buttons between tabs.

The Talking head tab comes from ``app/ui/talking_head_tab.py`` (written with the talking-head
engine). Its ``build(services)`` may return an object with a ``source_image`` image component;
"Send to talking head" buttons fill it. Until that module exists the tab says where it comes from.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.services import StudioServices

TALKING_HEAD_MODULE = "app.ui.talking_head_tab"
PUBLIC_ENDPOINTS = ("txt2img", "img2img", "extras")


def _build_talking_head(services: StudioServices) -> Any:
    """The talking-head tab when its module exists; its ``source_image`` (or None)."""
    import gradio as gr

    if importlib.util.find_spec(TALKING_HEAD_MODULE) is None:
        gr.Markdown(
            "### Talking head\nThe talking-head tab (a portrait and a speech recording in, a video of "
            "that face speaking out) is added here by the talking-head engine's UI.",
            elem_id="talking_head_placeholder",
        )
        return None
    module = importlib.import_module(TALKING_HEAD_MODULE)
    handle = module.build(services)
    return getattr(handle, "source_image", None)


def _build_gpu_notice() -> None:
    """Above the tabs: an NVIDIA GPU that this PyTorch cannot use, and the command that fixes it."""
    import gradio as gr

    from app.gpu_check import gpu_notice

    notice = gpu_notice()
    if notice:
        gr.Markdown(f"**GPU not used:** {notice}", elem_id="gpu_notice")


def build_ui(services: StudioServices) -> Any:
    import gradio as gr

    from app.ui import (
        extras_tab,
        image_browser_tab,
        img2img_tab,
        png_info_tab,
        presets_tab,
        queue_tab,
        send_to,
        settings_tab,
        txt2img_tab,
    )

    services.start_queue()
    with gr.Blocks(title="SD Studio") as demo:
        _build_gpu_notice()
        pages: dict[str, Any] = {}
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("txt2img", id="txt2img", elem_id="tab_txt2img") as pages["txt2img"]:
                txt2img = txt2img_tab.build(services)
            with gr.Tab("img2img", id="img2img", elem_id="tab_img2img") as pages["img2img"]:
                img2img = img2img_tab.build(services)
            with gr.Tab("Extras", id="extras", elem_id="tab_extras") as pages["extras"]:
                extras = extras_tab.build(services)
            with gr.Tab("PNG Info", id="pnginfo", elem_id="tab_pnginfo") as pages["pnginfo"]:
                png_info = png_info_tab.build(services)
            with gr.Tab("Image Browser", id="browser", elem_id="tab_browser") as pages["browser"]:
                browser = image_browser_tab.build(services)
            with gr.Tab("Talking head", id="talking_head", elem_id="tab_talking_head") as pages[
                "talking_head"
            ]:
                talking_head_image = _build_talking_head(services)
            with gr.Tab("Presets", id="presets", elem_id="tab_presets") as pages["presets"]:
                presets_tab.build(services)
            with gr.Tab("Settings", id="settings", elem_id="tab_settings") as pages["settings"]:
                settings_tab.build(services)
            with gr.Tab("Queue / Cluster", id="queue", elem_id="tab_queue") as pages["queue"]:
                queue = queue_tab.build(services)
        targets = send_to.SendTargets(
            tabs=tabs, txt2img=txt2img, img2img=img2img, extras=extras, talking_head_image=talking_head_image
        )
        send_to.wire(services, targets, png_info)
        _wire_image_browser(services, targets, browser, pages["browser"])
        _restore_jobs_on_load(services, demo, {"txt2img": txt2img, "img2img": img2img, "extras": extras})
        # the Queue tab refreshes itself only while it is open
        quiet: dict[str, Any] = {"show_progress": "hidden", "concurrency_limit": None}
        for name, page in pages.items():
            opened = name == "queue"
            page.select(
                lambda auto, opened=opened: queue.on_tab_selected(opened, auto),
                inputs=queue.auto,
                outputs=queue.timer,
                **quiet,
            )
        pages["queue"].select(queue.refresh_lists, outputs=queue.tables, **quiet)
    hide_internal_endpoints(demo)
    return demo


def _wire_image_browser(services: StudioServices, targets: Any, browser: Any, page: Any) -> None:
    """The browser lists outputs whenever its tab is opened; its send buttons reach every tab."""
    from app.ui import send_to

    quiet: dict[str, Any] = {"show_progress": "hidden", "concurrency_limit": None}
    page.select(browser.reload, inputs=browser.inputs, outputs=browser.outputs, **quiet)
    for target, button in browser.send_buttons.items():
        if target == "talking_head" and targets.talking_head_image is None:
            button.visible = False
            continue
        send_to.wire_button(services, targets, button, target, {browser.state}, browser.source)


def _restore_jobs_on_load(services: StudioServices, demo: Any, tabs: dict[str, Any]) -> None:
    """On every page load (a reload, a new tab, after a restart of the studio) each generation tab
    gets this user's last results back from the durable queue, or follows their running job."""
    from app.ui.job_runner import GPU_CONCURRENCY_ID, GPU_EVENT_LIMIT, JobRunner
    from app.ui.results_panel import restore_handler

    runner = JobRunner(services)
    for kind, tab in tabs.items():
        demo.load(
            restore_handler(tab.panel, runner, kind),
            inputs={tab.panel.state},
            outputs=tab.panel.outputs,
            show_progress="hidden",
            concurrency_id=GPU_CONCURRENCY_ID,
            concurrency_limit=GPU_EVENT_LIMIT,
        )


def hide_internal_endpoints(demo: Any) -> None:
    """Keep only the generation events in Gradio's "Use via API" page; the rest (refresh
    buttons, "send to", gallery selection...) are the page's plumbing, not an API. Programs
    should use the REST API, which takes the same request models."""
    for function in demo.fns.values():
        if function.api_name not in PUBLIC_ENDPOINTS:
            function.api_visibility = "private"
