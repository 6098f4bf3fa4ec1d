# STAND-IN for the few attributes of nixpkgs' `pkgs` that deploy/nixos/*.nix use (see
# lib.nix). Packages are attribute sets with a fake store path; formats.toml's
# `generate` does not write TOML: it keeps the value (`standInValue`) for the tests,
# which write TOML with Python and load it with Circus's own config loader. Like the real
# formats.toml it refuses null (TOML has none).
{ lib }:
let
  b = builtins;
  fake = name: { inherit name; outPath = "/nix/store/00000000000000000000000000000000-${name}"; };
  noNulls = loc: v:
    if v == null then throw "stand-in formats.toml: null at ${loc} (TOML has no null)"
    else if b.isAttrs v then b.all (n: noNulls "${loc}.${n}" v.${n}) (b.attrNames v)
    else if b.isList v then b.all (noNulls loc) v
    else true;
in
{
  system = "x86_64-linux";
  stdenv.hostPlatform.system = "x86_64-linux";
  formats.toml = { }: {
    type = lib.types.freeform;
    generate = name: value:
      assert noNulls name value;
      fake name // { standInValue = value; };
  };
  # python3Packages: the nixpkgs attribute names flake.nix may use (an unknown name fails)
  python3Packages = b.listToAttrs (map (n: { name = n; value = fake "python3.12-${n}" // { pname = n; }; }) [
    "celery" "redis" "kombu" "flask" "flask-smorest" "sqlalchemy" "alembic" "psycopg2"
    "pycapnp" "fabric" "boto3" "prometheus-flask-exporter" "flask-login" "python-ldap"
    "authlib" "joserfc" "pydantic" "argon2-cffi" "cryptography" "zstandard" "gunicorn"
    "requests" "flask-limiter" "flask-cors" "flask-wtf" "setuptools" "wheel" "pytest"
    "pytest-timeout" "hypothesis" "aiosmtpd" "mypy" "types-requests" "packaging"
  ]) // {
    # keeps its arguments for the tests instead of building
    buildPythonApplication = args: fake "${args.pname}-${args.version}" // { standInArgs = args; };
  };
  mkShell = args: fake "shell" // { standInArgs = args; };
} // b.listToAttrs (map (n: { name = n; value = fake n; })
  [ "nix" "git" "openssh" "nix-eval-jobs" "zstd" "xz" "coreutils" "circus" "circus-agent"
     "postgresql" "redis" "ruff" ])
