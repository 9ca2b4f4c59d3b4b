"""One class-name rule: exact, else case- and underscore-insensitive when unambiguous;
label maps."""

from pathlib import Path

import pytest

from avfuse.labels import ClassNameError, class_key, match_class_names, read_label_map


def test_underscore_folders_match_label_map_names():
    classes = ["air drumming", "abseiling", "tai chi"]
    assert match_class_names(["air_drumming", "Abseiling", '"tai chi"'], classes) == [0, 1, 2]


def test_classes_differing_only_in_case_match_exactly():
    classes = ["Jogging", "jogging"]
    assert match_class_names(["jogging", "Jogging"], classes) == [1, 0]
    # a loose name that could be either is not guessed
    assert match_class_names(["JOGGING"], classes) == [-1]


def test_exact_match_takes_its_class_away_from_loose_names():
    assert match_class_names(["air drumming", "air_drumming"], ["air drumming"]) == [0, -1]


def test_unknown_names_have_no_match():
    assert match_class_names(["skydiving"], ["abseiling"]) == [-1]
    assert class_key("Playing_Bass  Guitar ") == class_key("playing bass guitar")


def test_label_map_forms(tmp_path):
    p = tmp_path / "m.txt"
    p.write_text("0 abseiling\n1 air drumming\n\n", "utf-8")
    assert read_label_map(p) == ["abseiling", "air drumming"]
    p.write_text("abseiling\nabseiling\n", "utf-8")
    with pytest.raises(ClassNameError, match="duplicated"):
        read_label_map(p)
    p.write_text("", "utf-8")
    with pytest.raises(ClassNameError, match="empty"):
        read_label_map(p)


@pytest.mark.parametrize("kind", ["long_index", "oversize", "long_bad_name", "long_duplicate"])
def test_a_hostile_label_map_is_refused_in_one_short_line_naming_it(
    tmp_path: Path, kind: str
) -> None:
    from avfuse.labels import ClassNameError, read_label_map

    path = tmp_path / "label_map.txt"
    if kind == "long_index":
        path.write_text("9" * 100_000 + " abseiling\n1 zumba\n", "utf-8")
    elif kind == "oversize":
        with open(path, "wb") as fh:  # sparse: a size on paper, nothing to read
            fh.truncate(200 << 20)
    elif kind == "long_bad_name":
        path.write_text("a\n" + "\x01" * 1_000_000 + "\n", "utf-8")
    else:
        path.write_text(("y" * 1_000_000 + "\n") * 2, "utf-8")
    with pytest.raises(ClassNameError) as err:
        read_label_map(path)
    message = str(err.value)
    assert str(path) in message and len(message) < 1000, message[:300]
