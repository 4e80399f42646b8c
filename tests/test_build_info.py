"""``python -m metapeft.build_info`` says which copy of metapeft it inspected: run from a source root after a
non-editable install it reported "_C is not built" about the source tree without saying so."""

from importlib.metadata import PathDistribution

import metapeft.build_info
from metapeft.build_info import format_build_info, format_origin, package_origin


def installed_distribution(site, editable_source=None) -> PathDistribution:
    """A metapeft distribution installed into ``site`` (its package there), or an editable one of a source tree."""
    (site / "metapeft").mkdir(parents=True)
    (site / "metapeft" / "__init__.py").write_text("")
    info = site / "metapeft-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: metapeft\nVersion: 0.1.0\n")
    if editable_source is not None:
        (info / "direct_url.json").write_text(f'{{"dir_info": {{"editable": true}}, "url": "file://{editable_source}"}}')
    return PathDistribution(info)


def test_a_source_tree_shadowing_an_installed_copy_is_named(tmp_path, monkeypatch):
    source = tmp_path / "checkout" / "metapeft"
    source.mkdir(parents=True)
    origin = package_origin(source, installed_distribution(tmp_path / "site"))
    assert origin["shadowed"] and origin["path"] == str(source) and origin["installed"] == str(tmp_path / "site" /
                                                                                              "metapeft")
    line = format_origin(origin)
    assert f"inspected the copy at {source}, which shadows the installed copy at {tmp_path / 'site' / 'metapeft'}" \
        in line and "run from another directory" in line
    monkeypatch.setattr(metapeft.build_info, "package_origin", lambda: origin)
    report = format_build_info(metapeft.build_info.build_info())
    assert report.splitlines()[0] == line
    if not metapeft.build_info.build_info()["extension"]["built"]:
        assert f"(in the inspected copy at {source})" in report


def test_the_installed_and_editable_copies_are_not_shadowed(tmp_path):
    installed = installed_distribution(tmp_path / "site")
    origin = package_origin(tmp_path / "site" / "metapeft", installed)
    assert not origin["shadowed"] and "(the installed copy)" in format_origin(origin)
    checkout = tmp_path / "checkout"
    (checkout / "metapeft").mkdir(parents=True)
    editable = installed_distribution(tmp_path / "site2", editable_source=checkout)
    origin = package_origin(checkout / "metapeft", editable)
    assert not origin["shadowed"] and "(an editable install of this source tree)" in format_origin(origin)


def test_this_process_reports_the_copy_it_imported():
    origin = metapeft.build_info.build_info()["package"]
    assert origin["path"] == str(metapeft.build_info.Path(metapeft.__file__).resolve().parent)
