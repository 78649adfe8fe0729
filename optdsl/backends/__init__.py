"""Code generators: each turns a checked plan (optdsl.sym.Plan) into source text."""
