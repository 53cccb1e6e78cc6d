"""Image Browser tab: everything in ``outputs/`` (A1111's "Image Browser" extension, InvokeAI's
boards), so nothing an artist made disappears from view after a reload or a restart.

Pictures by folder and date, newest first, a page at a time, with cached thumbnails; the picked
one is shown with its infotext, can be sent to txt2img/img2img/inpaint/extras/talking head, opened
full size, or deleted after a confirmation (only inside ``outputs/``). With ``--auth`` each user
sees only the pictures their own jobs wrote, unless ``--share-outputs``.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import gradio as gr

from app.output_library import ALL, OutputAccessError, OutputLibrary, owned_outputs

if TYPE_CHECKING:
    from app.services import StudioServices

PREFIX = "browser"
PER_PAGE = 24
SEND_TARGETS = {
    "txt2img": "Send to txt2img",
    "img2img": "Send to img2img",
    "inpaint": "Send to inpaint",
    "extras": "Send to extras",
    "talking_head": "Send to talking head",
}


@dataclass
class BrowserView:
    """What one browser tab shows (kept in ``gr.State``): the current page's files and the pick."""

    paths: list[str] = field(default_factory=list)
    selected: str | None = None
    page: int = 1


@dataclass
class ImageBrowserTab:
    state: Any
    send_buttons: dict[str, Any]
    reload: Callable[..., dict[Any, Any]]  # the tab-opened handler (see ``outputs``)
    inputs: set[Any]
    outputs: set[Any]

    def source(self, data: dict[Any, Any]) -> tuple[str | None, str]:
        """(path, infotext) of the picked picture, for the "send to" buttons."""
        view: BrowserView = data[self.state]
        if not view.selected:
            return None, ""
        from app.ui.job_runner import read_infotext

        return view.selected, read_infotext(view.selected)


def visibility(services: StudioServices, request: Any) -> Callable[[Path], bool] | None:
    """Which pictures this user may browse: None (all) without ``--auth`` or with
    ``--share-outputs``; else only those their jobs wrote (UI and API logins are one user)."""
    user = getattr(request, "username", None) if request is not None else None
    if not user or getattr(services.settings, "share_outputs", False):
        return None
    store = services.start_queue().store
    records = [*store.list(owner=str(user), limit=100_000), *store.list(owner=f"user:{user}", limit=100_000)]
    owned = owned_outputs(records)
    return lambda path: Path(path).resolve() in owned


def file_link(path: str) -> str:
    """A link that opens the full-size file in a new browser tab (served by the output guard)."""
    return f"/gradio_api/file={quote(str(Path(path).resolve()))}"


def describe(library: OutputLibrary, path: str | None) -> str:
    if not path:
        return ""
    file = Path(path)
    try:
        stat = file.stat()
        relative = file.resolve().relative_to(library.outputs_root.resolve())
    except (OSError, ValueError):
        return f"{html.escape(file.name)}: no longer there"
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(stat.st_mtime))
    size = f"{stat.st_size / 1024:.0f} KB" if stat.st_size < 2**20 else f"{stat.st_size / 2**20:.1f} MB"
    return (
        f'<div class="sd-browser-file"><b>{html.escape(str(relative))}</b> · {when} · {size} · '
        f'<a href="{html.escape(file_link(path))}" target="_blank" rel="noopener" '
        f'id="{PREFIX}_open_file">Open file</a></div>'
    )


def build(services: StudioServices) -> ImageBrowserTab:
    library = OutputLibrary(services.outputs_root, services.settings.data_dir / "cache" / "thumbnails")
    state = gr.State(BrowserView())
    with gr.Row(equal_height=True):
        folder = gr.Dropdown(choices=[ALL], value=ALL, label="Folder", elem_id=f"{PREFIX}_folder", scale=2)
        day = gr.Dropdown(choices=[ALL], value=ALL, label="Date", elem_id=f"{PREFIX}_day", scale=2)
        search = gr.Textbox(
            label="Search prompts and parameters",
            placeholder="e.g. lighthouse Euler",
            elem_id=f"{PREFIX}_search",
            scale=4,
        )
        refresh = gr.Button("Refresh", elem_id=f"{PREFIX}_refresh", scale=0, min_width=110)
    with gr.Row(equal_height=True):
        previous = gr.Button(
            "◀ Previous page", elem_id=f"{PREFIX}_previous", size="sm", scale=0, min_width=140
        )
        page_info = gr.Markdown("", elem_id=f"{PREFIX}_page_info")
        following = gr.Button("Next page ▶", elem_id=f"{PREFIX}_next", size="sm", scale=0, min_width=140)
    with gr.Row():
        with gr.Column(scale=3):
            gallery = gr.Gallery(
                label="Outputs, newest first",
                columns=6,
                height="auto",
                object_fit="contain",
                allow_preview=False,
                interactive=False,
                elem_id=f"{PREFIX}_gallery",
            )
        with gr.Column(scale=2):
            picked = gr.Image(
                label="Picked image", interactive=False, elem_id=f"{PREFIX}_picked", height=360, format="png"
            )
            details = gr.HTML("", elem_id=f"{PREFIX}_details")
            infotext = gr.Textbox(
                label="Generation parameters",
                lines=5,
                interactive=False,
                elem_id=f"{PREFIX}_infotext",
                buttons=["copy"],
            )
            send_buttons: dict[str, Any] = {}
            with gr.Row():
                for target, label in SEND_TARGETS.items():
                    send_buttons[target] = gr.Button(
                        label, size="sm", elem_id=f"{PREFIX}_send_to_{target}", min_width=100
                    )
            delete = gr.Button("Delete…", variant="stop", size="sm", elem_id=f"{PREFIX}_delete")
            with gr.Row(visible=False, elem_id=f"{PREFIX}_confirm_row") as confirm_row:
                confirm_text = gr.Markdown("", elem_id=f"{PREFIX}_confirm_text")
                confirm = gr.Button("Yes, delete it", variant="stop", size="sm", elem_id=f"{PREFIX}_confirm")
                cancel = gr.Button("Keep it", size="sm", elem_id=f"{PREFIX}_cancel_delete")
            message = gr.Markdown("", elem_id=f"{PREFIX}_message")

    listing = {gallery, page_info, folder, day, state, picked, details, infotext, confirm_row, message}

    def show_page(data: dict[Any, Any], request: gr.Request, page: int | None = None) -> dict[Any, Any]:
        view: BrowserView = data[state]
        images = library.scan(visibility(services, request))
        chosen_folder = data[folder] if data[folder] in [ALL, *library.folders(images)] else ALL
        chosen_day = data[day] if data[day] in [ALL, *library.days(images)] else ALL
        result = library.page(
            images,
            folder=chosen_folder,
            day=chosen_day,
            search=data[search] or "",
            page=view.page if page is None else page,
            per_page=PER_PAGE,
        )
        view.page = result.page
        view.paths = [str(image.path) for image in result.images]
        if view.selected not in view.paths:
            view.selected = None
        items = []
        for image in result.images:
            try:
                items.append((library.thumbnail(image.path), image.name))
            except OSError:
                continue  # unreadable or removed meanwhile: the next refresh drops it
        text = (
            f"Page {result.page} of {result.pages} · {result.total} picture{'s' if result.total != 1 else ''}"
            if result.total
            else "No pictures here yet: what you generate appears here, newest first."
        )
        return {
            state: view,
            gallery: gr.update(value=items, selected_index=None),
            page_info: text,
            folder: gr.update(choices=[ALL, *library.folders(images)], value=chosen_folder),
            day: gr.update(choices=[ALL, *library.days(images)], value=chosen_day),
            picked: None if view.selected is None else gr.update(),
            details: "" if view.selected is None else gr.update(),
            infotext: "" if view.selected is None else gr.update(),
            confirm_row: gr.update(visible=False),
            message: "",
        }

    def first_page(data: dict[Any, Any], request: gr.Request) -> dict[Any, Any]:
        return show_page(data, request, page=1)

    def step(offset: int) -> Callable[[dict[Any, Any], gr.Request], dict[Any, Any]]:
        def go(data: dict[Any, Any], request: gr.Request) -> dict[Any, Any]:
            return show_page(data, request, page=data[state].page + offset)

        return go

    def pick(data: dict[Any, Any], event: gr.SelectData) -> dict[Any, Any]:
        view: BrowserView = data[state]
        index = event.index if isinstance(event.index, int) else -1
        view.selected = view.paths[index] if 0 <= index < len(view.paths) else None
        path = view.selected
        return {
            state: view,
            picked: path,
            details: describe(library, path),
            infotext: library.infotext(Path(path)) if path else "",
            confirm_row: gr.update(visible=False),
            message: "",
        }

    def ask_delete(data: dict[Any, Any]) -> dict[Any, Any]:
        view: BrowserView = data[state]
        if not view.selected:
            raise gr.Error("Pick a picture to delete first.", print_exception=False)
        name = html.escape(Path(view.selected).name)
        return {
            confirm_row: gr.update(visible=True),
            confirm_text: f"Delete **{name}** from the outputs folder? This cannot be undone.",
        }

    def do_delete(data: dict[Any, Any], request: gr.Request) -> dict[Any, Any]:
        view: BrowserView = data[state]
        if not view.selected:
            raise gr.Error("Pick a picture to delete first.", print_exception=False)
        try:
            gone = library.delete(view.selected, visibility(services, request))
        except OutputAccessError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        view.selected = None
        values = show_page(data, request)
        values[message] = f"Deleted {html.escape(gone.name)}."
        return values

    quiet: dict[str, Any] = {"show_progress": "hidden", "concurrency_limit": None}
    inputs = {state, folder, day, search}
    for trigger in (refresh.click, search.submit, folder.input, day.input):
        trigger(first_page, inputs=inputs, outputs=listing, **quiet)
    previous.click(step(-1), inputs=inputs, outputs=listing, **quiet)
    following.click(step(+1), inputs=inputs, outputs=listing, **quiet)
    gallery.select(
        pick, inputs={state}, outputs={state, picked, details, infotext, confirm_row, message}, **quiet
    )
    delete.click(ask_delete, inputs={state}, outputs={confirm_row, confirm_text}, **quiet)
    cancel.click(lambda: gr.update(visible=False), outputs=confirm_row, **quiet)
    confirm.click(do_delete, inputs=inputs, outputs=listing, **quiet)

    def reload(data: dict[Any, Any], request: gr.Request) -> dict[Any, Any]:
        return show_page(data, request)

    return ImageBrowserTab(
        state=state, send_buttons=send_buttons, reload=reload, inputs=inputs, outputs=listing
    )
