"""The bash script the completion tests (unit and test bed) run: it completes
COMP_LINE as bash's programmable completion would (the shipped completion file
sourced, COMP_* set as bash sets them) and prints COMPREPLY, one per line.
Arguments: the completion file, then COMP_LINE."""

COMPLETE_SH = r"""
source "$1"
COMP_LINE="$2"; COMP_POINT=${#COMP_LINE}
read -ra COMP_WORDS <<< "$COMP_LINE"
[[ "$COMP_LINE" == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
_python_argcomplete scistreamctl
printf '%s\n' "${COMPREPLY[@]}"
"""
