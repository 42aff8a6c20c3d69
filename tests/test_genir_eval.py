"""GenIR evaluation inputs: targets must be indexed images."""

from __future__ import annotations

from pathlib import Path

import pytest

from imageloop.errors import ImageloopError
from imageloop.eval.genir import load_targets
from imageloop.tools.indexing.image_index import open_index
from imageloop.tools.indexing.indexer import index_folder
from tests.fakes import FakeHashEmbedder
from tests.image_folders import numbered_images, sha256, write_image


@pytest.fixture
def indexed(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    numbered_images(folder, 3)
    index_folder(folder, FakeHashEmbedder(embeds_images=True), None, progress=False)
    return folder


def test_targets_from_a_list_file_resolve_to_their_index_ids(indexed: Path, tmp_path: Path) -> None:
    listing = tmp_path / "targets.txt"
    listing.write_text(f"# targets\n{indexed / 'img01.png'}\n\n{indexed / 'img02.png'}\n")
    targets = load_targets(listing, open_index(indexed))
    assert [t.id for t in targets] == [sha256(indexed / "img01.png"), sha256(indexed / "img02.png")]


def test_a_target_that_is_not_in_the_index_is_refused_by_name(indexed: Path, tmp_path: Path) -> None:
    stranger = write_image(tmp_path / "elsewhere" / "stranger.png", 250)
    with pytest.raises(ImageloopError, match=r"stranger\.png is not in the index"):
        load_targets(stranger.parent, open_index(indexed))


def test_an_empty_target_folder_is_refused(indexed: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageloopError, match="no target images found"):
        load_targets(tmp_path / "empty", open_index(indexed))
