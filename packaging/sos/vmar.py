# sos report plugin for vmar: what a support case about vmar devices needs, gathered read-only
# (vmarctl's JSON, the configuration, the units' state and vmard's journal). The vmar package
# installs it as /usr/share/vmar/sos/vmar.py; link it into sos's plugin directory
# (ln -s /usr/share/vmar/sos/vmar.py /usr/lib/python3/dist-packages/sos/report/plugins/)
# and `sos report -o vmar` runs it.

from sos.report.plugins import IndependentPlugin, Plugin


class Vmar(Plugin, IndependentPlugin):
    """vmar serves identical blocks of VM images from one cached copy through device-mapper
    devices; this collects its devices, images, statistics and health, its configuration,
    and the journal of vmard and its companion units.
    """

    short_desc = 'vmar VM image block redirection'
    plugin_name = 'vmar'
    profiles = ('storage', 'virt')
    packages = ('vmar',)
    services = ('vmard',)

    def setup(self):
        self.add_copy_spec([
            '/etc/vmar/vmar.toml',
            '/var/lib/prometheus/node-exporter/vmar.prom',
        ])
        # The read-only socket answers whatever the main socket's mode is.
        ctl = 'vmarctl --socket /run/vmar/vmard.ro.sock'
        self.add_cmd_output([
            f'{ctl} --json ping',
            f'{ctl} --json list',
            f'{ctl} --json images',
            f'{ctl} --json stats',
            f'{ctl} --json restore-status',
            f'{ctl} metrics',
            'vmarctl --json check',
            'vmard --check-config',
            ('systemctl status vmard.service vmar-restore-check.service '
            'vmar-metrics.timer vmar-metrics.service'),
            'dmsetup info -c --noheadings -o name,uuid,attr,open,major,minor',
            'losetup --list --json',
        ])
        self.add_journal(units=['vmard', 'vmar-restore-check', 'vmar-metrics'])
