"""`tunelab export`: a run as a merged HF folder (`--merged`, `--dtype`) or a GGUF file (`--gguf`, `--type`) with an
Ollama Modelfile beside it — the command's wording; the work is in `export.py` and `gguf_export/`."""

from __future__ import annotations

import shlex

from .errors import TunelabError


def cmd_export(args) -> int:
    from .console import phase

    if args.gguf:
        from .gguf_export import export_gguf, modelfile_path, ollama_name

        if args.dtype:
            raise TunelabError("export: --dtype is for --merged; a GGUF's tensor type is --type")
        qtype = args.type or "f16"
        with phase(f"exporting {args.run_dir} to GGUF ({qtype})", delay=3.0):
            out = export_gguf(args.run_dir, args.gguf, qtype, overwrite=args.overwrite)
        modelfile = modelfile_path(out)
        print(f"GGUF ({qtype}) written to {out}")
        print(f"Ollama Modelfile written to {modelfile}; to run it in Ollama:")
        print(f"  ollama create {ollama_name(out.stem)} -f {shlex.quote(str(modelfile))}")
        return 0
    from .export import export_merged

    if args.type:
        raise TunelabError("export: --type is for --gguf; the merged folder's dtype is --dtype")
    with phase(f"merging {args.run_dir} into a full model", delay=3.0):
        out = export_merged(args.run_dir, args.merged, dtype=args.dtype)
    print(f"merged model{f' ({args.dtype})' if args.dtype else ''} written to {out}")
    return 0
