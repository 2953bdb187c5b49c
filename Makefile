# Build and install vmar. `make install DESTDIR=/tmp/pkg` stages a package tree.
PREFIX ?= /usr
DESTDIR ?=
BINDIR = $(DESTDIR)$(PREFIX)/bin
UNITDIR = $(DESTDIR)/lib/systemd/system
RULESDIR = $(DESTDIR)/lib/udev/rules.d
MANDIR = $(DESTDIR)$(PREFIX)/share/man/man1
LIBDIR = $(DESTDIR)$(PREFIX)/lib/vmar
RELEASE = target/release

.PHONY: build install uninstall test

build:
	cargo build --release --locked --bins

install: build
	install -Dm755 $(RELEASE)/vmard $(BINDIR)/vmard
	install -Dm755 $(RELEASE)/vmarctl $(BINDIR)/vmarctl
	install -Dm644 systemd/vmard.service $(UNITDIR)/vmard.service
	install -Dm644 udev/61-vmar.rules $(RULESDIR)/61-vmar.rules
	install -Dm644 packaging/udev/59-vmar-loop.rules $(RULESDIR)/59-vmar-loop.rules
	install -Dm755 packaging/udev/vmar-loop-image $(LIBDIR)/vmar-loop-image
	# Keep an existing configuration.
	[ -e $(DESTDIR)/etc/vmar/vmar.toml ] || install -Dm644 etc/vmar.toml $(DESTDIR)/etc/vmar/vmar.toml
	# The image root vmar.toml names (vmard starts without it, but nothing could be captured).
	# /var/lib/vmar itself gets mode 0700 from the unit (StateDirectoryMode=).
	install -d -m755 $(DESTDIR)/var/lib/vmar/images
	install -d $(MANDIR) $(DESTDIR)$(PREFIX)/share/bash-completion/completions \
		$(DESTDIR)$(PREFIX)/share/zsh/vendor-completions $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d
	$(RELEASE)/vmarctl man --dir $(MANDIR) >/dev/null
	$(RELEASE)/vmard --man > $(MANDIR)/vmard.1
	$(RELEASE)/vmarctl completions bash > $(DESTDIR)$(PREFIX)/share/bash-completion/completions/vmarctl
	$(RELEASE)/vmarctl completions zsh > $(DESTDIR)$(PREFIX)/share/zsh/vendor-completions/_vmarctl
	$(RELEASE)/vmarctl completions fish > $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/vmarctl.fish
	@echo "installed; then: systemctl daemon-reload && udevadm control --reload && systemctl enable --now vmard"

uninstall:
	rm -f $(BINDIR)/vmard $(BINDIR)/vmarctl $(UNITDIR)/vmard.service $(RULESDIR)/61-vmar.rules \
		$(RULESDIR)/59-vmar-loop.rules $(LIBDIR)/vmar-loop-image \
		$(MANDIR)/vmarctl.1 $(MANDIR)/vmarctl-*.1 $(MANDIR)/vmard.1 $(DESTDIR)$(PREFIX)/share/bash-completion/completions/vmarctl \
		$(DESTDIR)$(PREFIX)/share/zsh/vendor-completions/_vmarctl \
		$(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/vmarctl.fish

test:
	tools/test
