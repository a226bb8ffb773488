"""pg_llm's numpy kernels: plain Python modules that PostgreSQL imports once per backend.

The extension script carries each module's source once (table llm_py_module); llm_py_boot() puts a finder
for `pg_llm.*` on sys.meta_path that compiles them from there, so a PL/Python body is just an import and a
call. Only numpy and the standard library may be imported here (and `pg_llm.kernels.*`): nothing else of
pg_llm exists inside the server. Offline, tests import the very same modules from the checkout."""
