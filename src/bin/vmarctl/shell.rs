//! vmarctl about itself: `completions` (with live image and device names through the hidden
//! `__complete`) and `man`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use vmar::error::ExitClass;
use vmar::protocol::request;

use crate::context::{Ctx, Run};

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    shell: clap_complete::Shell,
}

/// Bash: after clap's script, a wrapper that completes image and device arguments with the
/// names vmard knows (`vmarctl __complete`), and leaves everything else to clap's function.
const BASH_LIVE: &str = r#"
# Live names: image and device arguments complete from vmard (vmarctl __complete).
_vmarctl_live() {
    local cur=${COMP_WORDS[COMP_CWORD]} sub= kind= pos=0 i w
    local -a socket=()
    for ((i = 1; i < COMP_CWORD; i++)); do
        w=${COMP_WORDS[i]}
        case $w in
            --socket) socket=(--socket "${COMP_WORDS[i+1]}"); ((i++)) ;;
            --socket=*) socket=("$w") ;;
            -o|--options|--units|--separator|--name|--device|--target|--overlay) ((i++)) ;;
            -*) ;;
            *) if [[ -z $sub ]]; then sub=$w; else ((pos++)); fi ;;
        esac
    done
    if [[ $cur != -* ]]; then
        case $sub:$pos in
            map:0|table:0|verify:0|forget:0|create:1) kind=images ;;
            remove:0|status:0|refresh:0|stats:0|libvirt-xml:0|ensure:0) kind=devices ;;
        esac
    fi
    if [[ -n $kind ]]; then
        local IFS=$'\n'
        COMPREPLY=($(compgen -W "$(vmarctl "${socket[@]}" __complete "$kind" 2>/dev/null)" -- "$cur"))
        return 0
    fi
    _vmarctl "$@"
}
complete -F _vmarctl_live -o bashdefault -o default vmarctl
"#;

const FISH_LIVE: &str = r#"
# Live names from vmard (vmarctl __complete).
complete -c vmarctl -n '__fish_seen_subcommand_from map table verify forget create' -f -a '(vmarctl __complete images 2>/dev/null)'
complete -c vmarctl -n '__fish_seen_subcommand_from remove status refresh stats libvirt-xml ensure' -f -a '(vmarctl __complete devices 2>/dev/null)'
"#;

impl CompletionsArgs {
    /// Prints the script for `full`, vmarctl's whole command line.
    pub fn print(&self, full: clap::Command, out: &mut dyn Write) -> Result<ExitClass> {
        // clap_complete offers hidden subcommands too: leave __complete out of the scripts.
        let mut command = clap::Command::new("vmarctl")
            .version(env!("CARGO_PKG_VERSION"))
            .args(full.get_arguments().cloned())
            .subcommands(full.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
        let mut script = Vec::new();
        clap_complete::generate(self.shell, &mut command, "vmarctl", &mut script);
        out.write_all(&script)?;
        match self.shell {
            clap_complete::Shell::Bash => out.write_all(BASH_LIVE.as_bytes())?,
            clap_complete::Shell::Fish => out.write_all(FISH_LIVE.as_bytes())?,
            _ => {}
        }
        Ok(ExitClass::Success)
    }
}

#[derive(Args, Debug)]
pub struct ManArgs {
    /// Write vmarctl.1 and vmarctl-COMMAND.1 into DIR and print their paths.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

impl ManArgs {
    /// Prints or writes the pages of `full`, vmarctl's whole command line.
    pub fn print(&self, full: clap::Command, out: &mut dyn Write) -> Result<ExitClass> {
        crate::man::generate(full, self.dir.as_deref(), out)?;
        Ok(ExitClass::Success)
    }
}

#[derive(Args, Debug)]
pub struct CompleteArgs {
    what: Names,
}

/// What `__complete` lists.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Names {
    Images,
    Devices,
}

/// Prints image or device names; prints nothing when vmard cannot answer, since a shell
/// completing a word has nowhere to show an error.
impl Run for CompleteArgs {
    fn run(&self, ctx: &Ctx, out: &mut dyn Write) -> Result<ExitClass> {
        let names: Vec<String> = match self.what {
            Names::Images => ctx
                .images()
                .map(|l| l.images.into_iter().map(|i| i.record.name).collect())
                .unwrap_or_default(),
            Names::Devices => ctx
                .call(request::List)
                .map(|l| l.into_iter().map(|d| d.name).collect())
                .unwrap_or_default(),
        };
        for name in names {
            if writeln!(out, "{name}").is_err() {
                break;
            }
        }
        Ok(ExitClass::Success)
    }
}
