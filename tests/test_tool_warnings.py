"""Warnings that the scripts under tools/ print on stderr."""
import pytest

from conftest import run_tool

PKG_RESOURCES_WARNING = 'pkg_resources is deprecated as an API'


@pytest.mark.parametrize('args,expected', [
    (['tools/pack.py', '--help'], 'usage: pack.py'),
    (['tools/analysis/plot_mixture.py', '--help'], 'usage: plot_mixture.py'),
    # Loading a config with an 'mmdet::' base makes mmengine import
    # pkg_resources, which is what issues the warning.
    (['tools/show_bit_widths.py',
      'configs/trees/retinanet_mnv2_fpn_trees_dgms4.py'], '58 layers'),
], ids=['pack-help', 'plot-mixture-help', 'show-bit-widths'])
def test_tool_hides_pkg_resources_warning(args, expected):
    output = run_tool(args)
    assert expected in output
    assert PKG_RESOURCES_WARNING not in output


def test_warning_filter_keeps_other_warnings():
    code = (
        'import sys\n'
        'import warnings\n'
        "sys.path.insert(0, 'tools')\n"
        'import warning_filters\n'
        f'warnings.warn({PKG_RESOURCES_WARNING!r}, UserWarning)\n'
        "warnings.warn('another user warning', UserWarning)\n"
        f"warnings.warn({PKG_RESOURCES_WARNING + ' (other category)'!r}, "
        'DeprecationWarning)\n')
    output = run_tool(['-W', 'default', '-c', code])
    assert 'UserWarning: another user warning' in output
    assert (f'DeprecationWarning: {PKG_RESOURCES_WARNING} (other category)'
            in output)
    assert f'UserWarning: {PKG_RESOURCES_WARNING}' not in output
