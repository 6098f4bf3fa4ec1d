{
  description = "Circus: a Nix continuous-integration system";

  # No flake.lock is committed: it cannot be generated offline. `nix flake lock` (or the
  # first `nix build` / `nix flake check`) writes it; commit it in your deployment.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      version = "0.1.0"; # setup.cfg [metadata] version

      # setup.cfg install_requires -> nixpkgs python3Packages attribute names
      serverDeps = ps: with ps; [
        celery redis kombu flask flask-smorest sqlalchemy alembic psycopg2 pycapnp fabric
        boto3 prometheus-flask-exporter flask-login python-ldap authlib joserfc pydantic
        argon2-cffi cryptography zstandard gunicorn requests flask-limiter flask-cors
        flask-wtf
      ];
      # what circus/agent and the circus.common / circus.protocol modules it imports load
      # (tests/deploy/test_flake.py imports them all and compares)
      agentDeps = ps: with ps; [ pycapnp pydantic zstandard ];
      # what circus/worker, celeryconfig and the circus.common / circus.queue_runner.routing
      # modules they import load: Celery and its broker transports (redis, and packaging,
      # which kombu's redis transport imports, for redis://; kombu brings amqp for
      # amqp://), requests for the server's API, pydantic for the config. No database,
      # LDAP, web or S3 library: the worker host has no database password and talks to
      # the server's API only (tests/unit/test_layering.py); test_flake.py compares.
      workerDeps = ps: with ps; [ celery kombu redis packaging requests pydantic ];

      # `program`: a lean package that installs only this entry point (its host needs
      # none of the server's libraries); null: the whole application
      mkCircus = pkgs: { pname, deps, program ? null, importsCheck, tools ? [ ] }:
        let lean = program != null; in
        pkgs.python3Packages.buildPythonApplication {
          inherit pname version;
          pyproject = true;
          src = lib.cleanSource self;
          build-system = with pkgs.python3Packages; [ setuptools wheel ];
          dependencies = deps pkgs.python3Packages;
          # the daemons call these at run time (the NixOS modules also put them on PATH)
          makeWrapperArgs = [ "--suffix" "PATH" ":" (lib.makeBinPath tools) ];
          # a lean package leaves out the server's libraries on purpose: setup.cfg's
          # install_requires lists them all, so pip's runtime dependency check must not run
          dontCheckRuntimeDeps = lean;
          postInstall = lib.optionalString lean ''
            find $out/bin -type f ! -name ${program} -delete
          '';
          pythonImportsCheck = importsCheck;
          # the test suite needs PostgreSQL, Redis and a Nix store: run it with `make test`
          doCheck = false;
          meta = {
            description = "Circus: a Nix continuous-integration system";
            license = lib.licenses.mit;
            mainProgram = if lean then program else "circus";
          };
        };
    in
    {
      packages = forAllSystems (pkgs: rec {
        circus = mkCircus pkgs {
          pname = "circus";
          deps = serverDeps;
          tools = with pkgs; [ nix git openssh zstd xz nix-eval-jobs ];
          importsCheck = [
            "circus.server.main" "circus.evaluator.main" "circus.queue_runner.main"
            "circus.agent.main" "circus.worker.main" "circus.cli.main"
          ];
        };
        circus-agent = mkCircus pkgs {
          pname = "circus-agent";
          deps = agentDeps;
          program = "circus-agent";
          tools = with pkgs; [ nix git openssh zstd xz ];
          importsCheck = [ "circus.agent.main" ];
        };
        # a build host's Celery worker: Nix calls only (nix copy, nix-store)
        circus-worker = mkCircus pkgs {
          pname = "circus-worker";
          deps = workerDeps;
          program = "circus-worker";
          tools = [ pkgs.nix ];
          importsCheck = [ "circus.worker.main" "circus.worker.builder" "celeryconfig" ];
        };
        default = circus;
      });

      apps = forAllSystems (pkgs:
        let
          app = pkg: name: { type = "app"; program = "${pkg}/bin/${name}"; };
          ours = self.packages.${pkgs.stdenv.hostPlatform.system};
        in {
          default = app ours.circus "circus";
          circus = app ours.circus "circus";
          circus-server = app ours.circus "circus-server";
          circus-admin = app ours.circus "circus-admin";
          circus-migrate = app ours.circus "circus-migrate";
          circus-agent = app ours.circus-agent "circus-agent";
          circus-worker = app ours.circus-worker "circus-worker";
        });

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = with pkgs; [
            (python3.withPackages (ps: serverDeps ps ++ (with ps; [
              setuptools wheel pytest pytest-timeout hypothesis aiosmtpd mypy types-requests
            ])))
            nix git openssh nix-eval-jobs postgresql redis zstd xz ruff
          ];
          shellHook = ''
            export PYTHONPATH="$PWD''${PYTHONPATH:+:$PYTHONPATH}"
          '';
        };
      });

      nixosModules = {
        circus = { pkgs, lib, ... }: {
          imports = [ ./deploy/nixos/circus.nix ];
          services.circus.package =
            lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.circus;
        };
        circus-agent = { pkgs, lib, ... }: {
          imports = [ ./deploy/nixos/circus-agent.nix ];
          services.circus-agent.package =
            lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.circus-agent;
        };
        circus-worker = { pkgs, lib, ... }: {
          imports = [ ./deploy/nixos/circus-worker.nix ];
          services.circus-worker.package =
            lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.circus-worker;
        };
        default = self.nixosModules.circus;
      };

      checks = forAllSystems (pkgs:
        let system = pkgs.stdenv.hostPlatform.system; in {
          inherit (self.packages.${system}) circus circus-agent circus-worker;
          # the modules evaluated by the real NixOS module system (real option types,
          # assertions) and the resulting system built; tests/deploy only has a stand-in
          modules = (nixpkgs.lib.nixosSystem {
            inherit system;
            modules = [
              self.nixosModules.circus
              self.nixosModules.circus-agent
              self.nixosModules.circus-worker
              {
                boot.isContainer = true;
                system.stateVersion = "24.11";
                services.circus.enable = true;
                services.circus.settings.server.secret_key_file = "/run/secrets/circus-secret-key";
                services.circus-agent = {
                  enable = true;
                  runnerUrl = "tls://localhost:7000";
                  tokenFile = "/run/secrets/circus-agent-token";
                };
                services.circus-worker = {
                  enable = true;
                  serverUrl = "https://ci.example.org";
                  tokenFile = "/run/secrets/circus-worker-token";
                  brokerUrlFile = "/run/secrets/circus-broker-url";
                };
              }
            ];
          }).config.system.build.toplevel;
          # a second evaluator host (docs/INSTALL.md "Multi-host"): circus-evaluator
          # --no-beat only, against the main host's database and broker, uploading its
          # .drv files to the server
          second-evaluator = (nixpkgs.lib.nixosSystem {
            inherit system;
            modules = [
              self.nixosModules.circus
              {
                boot.isContainer = true;
                system.stateVersion = "24.11";
                services.circus = {
                  enable = true;
                  server.enable = false;
                  queueRunner.enable = false;
                  evaluator.beat = false;
                  database.createLocally = false;
                  redis.createLocally = false;
                  settings = {
                    database.url_file = "/run/secrets/circus-database-url";
                    broker.url_file = "/run/secrets/circus-broker-url";
                    evaluator.upload_derivations_to = "https://ci.example.org";
                    evaluator.upload_token_file = "/run/secrets/circus-evaluator-token";
                  };
                };
              }
            ];
          }).config.system.build.toplevel;
        });
    };
}
