# Build and install vmar. `make install DESTDIR=/tmp/pkg` stages a package tree.
PREFIX ?= /usr
DESTDIR ?=
BINDIR = $(DESTDIR)$(PREFIX)/bin
UNITDIR = $(DESTDIR)/lib/systemd/system
RULESDIR = $(DESTDIR)/lib/udev/rules.d
MANDIR = $(DESTDIR)$(PREFIX)/share/man/man1
MAN5DIR = $(DESTDIR)$(PREFIX)/share/man/man5
MAN8DIR = $(DESTDIR)$(PREFIX)/share/man/man8
# The sos report plugin: not in sos's own plugin directory, which would make the package
# depend on Python (lintian: python-package-missing-depends-on-python). README says how to
# link it there.
SOSDIR = $(DESTDIR)$(PREFIX)/share/vmar/sos
LIBDIR = $(DESTDIR)$(PREFIX)/lib/vmar
RELEASE = target/release

.PHONY: build install uninstall test

build:
	cargo build --release --locked --bins

install: build
	install -Dm755 $(RELEASE)/vmard $(BINDIR)/vmard
	install -Dm755 $(RELEASE)/vmarctl $(BINDIR)/vmarctl
	install -Dm644 systemd/vmard.service $(UNITDIR)/vmard.service
	install -Dm644 systemd/vmar-restore-check.service $(UNITDIR)/vmar-restore-check.service
	install -Dm644 systemd/vmar-metrics.service $(UNITDIR)/vmar-metrics.service
	install -Dm644 systemd/vmar-metrics.timer $(UNITDIR)/vmar-metrics.timer
	install -Dm644 udev/61-vmar.rules $(RULESDIR)/61-vmar.rules
	install -Dm755 udev/vmar-devnode $(DESTDIR)/lib/udev/vmar-devnode
	install -Dm644 packaging/udev/59-vmar-loop.rules $(RULESDIR)/59-vmar-loop.rules
	install -Dm755 packaging/udev/vmar-loop-image $(LIBDIR)/vmar-loop-image
	install -d $(DESTDIR)/etc/libvirt/hooks/qemu.d
	sed 's|@BINDIR@|$(PREFIX)/bin|' packaging/libvirt/qemu-hook > $(DESTDIR)/etc/libvirt/hooks/qemu.d/vmar
	chmod 755 $(DESTDIR)/etc/libvirt/hooks/qemu.d/vmar
	install -Dm644 packaging/libvirt/vmar-pool.xml $(DESTDIR)$(PREFIX)/share/vmar/libvirt-pool.xml
	install -Dm644 packaging/libvirt/vmar-tmpfiles.conf $(DESTDIR)$(PREFIX)/lib/tmpfiles.d/vmar.conf
	install -Dm755 packaging/udev/vmar-udev-trigger $(LIBDIR)/vmar-udev-trigger
	install -Dm644 packaging/apparmor/vmar-virt-aa-helper $(DESTDIR)/etc/apparmor.d/abstractions/vmar-virt-aa-helper
	install -Dm755 packaging/apparmor/vmar-apparmor $(LIBDIR)/vmar-apparmor
	install -Dm644 packaging/sos/vmar.py $(SOSDIR)/vmar.py
	# Keep an existing configuration.
	[ -e $(DESTDIR)/etc/vmar/vmar.toml ] || install -Dm644 etc/vmar.toml $(DESTDIR)/etc/vmar/vmar.toml
	# The image root vmar.toml names (vmard starts without it, but nothing could be captured).
	# /var/lib/vmar itself gets mode 0700 from the unit (StateDirectoryMode=).
	install -d -m755 $(DESTDIR)/var/lib/vmar/images
	install -d $(MANDIR) $(MAN5DIR) $(MAN8DIR) $(DESTDIR)$(PREFIX)/share/bash-completion/completions \
		$(DESTDIR)$(PREFIX)/share/zsh/vendor-completions $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d
	$(RELEASE)/vmarctl man --dir $(MANDIR) >/dev/null
	$(RELEASE)/vmard --man > $(MAN8DIR)/vmard.8
	$(RELEASE)/vmard --man-config > $(MAN5DIR)/vmar.toml.5
	$(RELEASE)/vmarctl completions bash > $(DESTDIR)$(PREFIX)/share/bash-completion/completions/vmarctl
	$(RELEASE)/vmarctl completions zsh > $(DESTDIR)$(PREFIX)/share/zsh/vendor-completions/_vmarctl
	$(RELEASE)/vmarctl completions fish > $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/vmarctl.fish
	@echo "installed; then: systemctl daemon-reload && udevadm control --reload && systemctl enable --now vmard vmar-metrics.timer"

uninstall:
	rm -f $(BINDIR)/vmard $(BINDIR)/vmarctl $(UNITDIR)/vmard.service $(RULESDIR)/61-vmar.rules \
		$(UNITDIR)/vmar-restore-check.service $(UNITDIR)/vmar-metrics.service $(UNITDIR)/vmar-metrics.timer \
		$(RULESDIR)/59-vmar-loop.rules $(LIBDIR)/vmar-loop-image $(LIBDIR)/vmar-udev-trigger $(SOSDIR)/vmar.py \
		$(DESTDIR)/lib/udev/vmar-devnode $(LIBDIR)/vmar-apparmor $(DESTDIR)/etc/apparmor.d/abstractions/vmar-virt-aa-helper \
		$(DESTDIR)/etc/libvirt/hooks/qemu.d/vmar $(DESTDIR)$(PREFIX)/share/vmar/libvirt-pool.xml \
		$(DESTDIR)$(PREFIX)/lib/tmpfiles.d/vmar.conf \
		$(MANDIR)/vmarctl.1 $(MANDIR)/vmarctl-*.1 $(MAN8DIR)/vmard.8 $(MAN5DIR)/vmar.toml.5 $(DESTDIR)$(PREFIX)/share/bash-completion/completions/vmarctl \
		$(DESTDIR)$(PREFIX)/share/zsh/vendor-completions/_vmarctl \
		$(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/vmarctl.fish

test:
	tools/test
