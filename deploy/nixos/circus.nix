# NixOS module: services.circus — the Circus server, evaluator and queue runner.
#
# Every daemon reads one TOML file rendered from `services.circus.settings` (the keys of
# deploy/circus.example.toml). Secrets are never written there: give them as `*_file`
# paths (e.g. settings.server.secret_key_file = "/run/secrets/circus-secret-key"), files
# the `circus` user can read; an inline secret fails the build with an assertion.
# PostgreSQL and Redis run on this host by default; set database.createLocally /
# redis.createLocally = false and settings.database.url(_file) / settings.broker.url(_file)
# to use others (multi-host layouts: docs/INSTALL.md).
{ config, lib, pkgs, ... }:

let
  cfg = config.services.circus;
  inherit (lib) mkOption mkEnableOption mkIf mkMerge mkDefault types;

  settingsFormat = pkgs.formats.toml { };
  settingsFile = settingsFormat.generate "circus.toml" cfg.settings;

  localDatabaseUrl = "postgresql:///${cfg.user}?host=/run/postgresql";
  localBrokerUrl = "redis+socket:///run/redis-circus/redis.sock";

  # secret keys of the settings (circus/common/config.py `secret_fields`) by path
  secretPaths = [
    [ "server" "secret_key" ]
    [ "server" "ldap" "bind_password" ]
    [ "evaluator" "upload_token" ]
    [ "signing" "key" ]
    [ "cache_upload" "s3" "access_key_id" ]
    [ "cache_upload" "s3" "secret_access_key" ]
    [ "notifications" "github_token" ]
    [ "notifications" "gitea_token" ]
    [ "notifications" "forgejo_token" ]
    [ "notifications" "gitlab_token" ]
    [ "notifications" "email" "password" ]
    [ "notifications" "slack" "webhook_url" ]
    [ "oauth" "github" "client_secret" ]
  ];
  # lists of tables whose entries carry a secret
  secretListPaths = [
    { path = [ "queue_runner" "ephemeral_pools" ]; key = "github_token"; }
    { path = [ "declarative" "users" ]; key = "password"; }
    { path = [ "declarative" "api_keys" ]; key = "key"; }
  ];
  get = path: lib.attrByPath path null cfg.settings;
  inlineSecrets =
    builtins.filter (path: get path != null) secretPaths
    ++ builtins.concatMap
      (entry: builtins.filter (path: path != null) (builtins.genList
        (i: if (builtins.elemAt (get entry.path) i) ? ${entry.key}
            then entry.path ++ [ (toString i) entry.key ] else null)
        (builtins.length (if get entry.path == null then [ ] else get entry.path))))
      secretListPaths;
  # a password in a database or broker URL is a secret too
  urlHasPassword = url: url != null && builtins.match "[a-z0-9+]+://[^/@:]*:[^/@]+@.*" url != null;
  showPath = builtins.concatStringsSep ".";

  rpc = lib.attrByPath [ "queue_runner" "rpc" ] { } cfg.settings;
  gatewayEnabled = (rpc.bind or null) != null;
  oidcEnabled = (lib.attrByPath [ "oidc" "issuer" ] null rpc) != null;
  pools = lib.attrByPath [ "queue_runner" "ephemeral_pools" ] [ ] cfg.settings;

  daemons = lib.filter (d: d.enable) [
    { name = "circus-server"; enable = cfg.server.enable; description = "Circus server: REST API, dashboard, binary cache"; }
    { name = "circus-evaluator"; enable = cfg.evaluator.enable; description = "Circus evaluator: jobset evaluations";
      args = lib.optionalString (!cfg.evaluator.beat) " --no-beat"; }
    { name = "circus-queue-runner"; enable = cfg.queueRunner.enable; description = "Circus queue runner: dispatcher, build workers, agent gateway"; }
  ];

  localServices =
    lib.optional cfg.database.createLocally "postgresql.service"
    ++ lib.optional cfg.redis.createLocally "redis-circus.service";

  # ProtectSystem=strict makes the file system read-only but for the state directory
  # and these: the GC roots and any configured directory outside /var/lib/circus
  # (which must exist)
  gcRootsDir = lib.attrByPath [ "gc" "gc_roots_dir" ] "/nix/var/nix/gcroots/circus" cfg.settings;
  writablePaths = [ gcRootsDir ] ++ builtins.filter
    (dir: dir != null && !(lib.hasPrefix "/var/lib/circus/" dir) && dir != "/var/lib/circus")
    (map get [ [ "evaluator" "work_dir" ] [ "logs" "log_dir" ] [ "cache" "cache_dir" ] ]);

  hardening = import ./hardening.nix // {
    User = cfg.user;
    Group = cfg.group;
    StateDirectory = "circus";
    StateDirectoryMode = "0750";
    ReadWritePaths = writablePaths;
  };

  environment = {
    CIRCUS_CONFIG_FILE = "/etc/circus/circus.toml";
    NIX_REMOTE = "daemon";
  };
in
{
  options.services.circus = {
    enable = mkEnableOption "Circus, a Nix continuous-integration system";

    package = mkOption {
      type = types.package;
      description = "The Circus package (the flake's packages.<system>.circus).";
    };

    user = mkOption {
      type = types.str;
      default = "circus";
      description = "User the daemons run as; also the local PostgreSQL role and database.";
    };

    group = mkOption {
      type = types.str;
      default = "circus";
      description = "Group the daemons run as.";
    };

    server.enable = mkOption {
      type = types.bool;
      default = true;
      description = "Run circus-server (API, dashboard, binary cache) on this host.";
    };
    evaluator.enable = mkOption {
      type = types.bool;
      default = true;
      description = "Run circus-evaluator on this host.";
    };
    evaluator.beat = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Run the evaluator's scheduler (Celery beat). Exactly one evaluator of an
        installation may: set false on the others (they run `--no-beat`).
      '';
    };
    queueRunner.enable = mkOption {
      type = types.bool;
      default = true;
      description = "Run circus-queue-runner (and the agent gateway, if configured) on this host.";
    };

    database.createLocally = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Run PostgreSQL here with a database and role named after `user` (peer
        authentication over /run/postgresql). When false, set settings.database.url_file
        (or a password-less settings.database.url).
      '';
    };

    redis.createLocally = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Run a Redis instance (services.redis.servers.circus, Unix socket only) as the
        broker. When false, set settings.broker.url(_file).
      '';
    };

    buildUsers = mkOption {
      type = types.int;
      default = 32;
      description = "Nix build users (nix.nrBuildUsers) for local builds of the queue runner.";
    };

    nginx = {
      enable = mkEnableOption "an nginx virtual host proxying to circus-server";
      hostName = mkOption {
        type = types.str;
        default = "localhost";
        description = "Virtual host name; also the default of settings.server.base_url.";
      };
      forceSSL = mkOption {
        type = types.bool;
        default = true;
        description = "Redirect HTTP to HTTPS (needs enableACME or the certificate options).";
      };
      enableACME = mkOption {
        type = types.bool;
        default = false;
        description = "Get the certificate from Let's Encrypt (security.acme).";
      };
      sslCertificate = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "TLS certificate file (when not using ACME).";
      };
      sslCertificateKey = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "TLS key file (when not using ACME); read by nginx, never copied to the store.";
      };
    };

    settings = mkOption {
      type = settingsFormat.type;
      default = { };
      example = lib.literalExpression ''
        {
          server.base_url = "https://ci.example.org";
          server.secret_key_file = "/run/secrets/circus-secret-key";
          queue_runner.rpc.bind = "0.0.0.0:7000";
          queue_runner.rpc.auth_tokens_file = "/run/secrets/circus-agent-token-digests";
        }
      '';
      description = ''
        Circus configuration (deploy/circus.example.toml), rendered to
        /etc/circus/circus.toml. Secrets only as `*_file` paths.
      '';
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      assertions = [
        {
          assertion = inlineSecrets == [ ];
          message = "services.circus.settings: secrets must be given by *_file path, not inline "
            + "(they would be copied into the world-readable Nix store): "
            + builtins.concatStringsSep ", " (map showPath inlineSecrets);
        }
        {
          assertion = !(urlHasPassword (get [ "database" "url" ]) || urlHasPassword (get [ "broker" "url" ]));
          message = "services.circus.settings: a database or broker URL with a password must be "
            + "given as database.url_file / broker.url_file";
        }
        {
          assertion = cfg.database.createLocally || get [ "database" "url" ] != null
            || get [ "database" "url_file" ] != null;
          message = "services.circus: database.createLocally = false needs settings.database.url_file "
            + "(or settings.database.url)";
        }
        {
          assertion = cfg.redis.createLocally || get [ "broker" "url" ] != null
            || get [ "broker" "url_file" ] != null;
          message = "services.circus: redis.createLocally = false needs settings.broker.url_file "
            + "(or settings.broker.url)";
        }
        {
          assertion = !oidcEnabled || gatewayEnabled;
          message = "services.circus: settings.queue_runner.rpc.oidc needs the agent gateway "
            + "(settings.queue_runner.rpc.bind)";
        }
        {
          assertion = pools == [ ] || (gatewayEnabled && oidcEnabled);
          message = "services.circus: settings.queue_runner.ephemeral_pools need the agent gateway "
            + "(settings.queue_runner.rpc.bind) and OIDC (settings.queue_runner.rpc.oidc.issuer)";
        }
        {
          assertion = !gatewayEnabled || cfg.queueRunner.enable;
          message = "services.circus: the agent gateway (settings.queue_runner.rpc.bind) runs in "
            + "the queue runner: enable queueRunner on this host";
        }
        {
          assertion = !cfg.nginx.enable || !cfg.nginx.forceSSL || cfg.nginx.enableACME
            || (cfg.nginx.sslCertificate != null && cfg.nginx.sslCertificateKey != null);
          message = "services.circus.nginx: forceSSL needs enableACME or sslCertificate and "
            + "sslCertificateKey";
        }
      ];

      services.circus.settings = {
        database.url = mkIf cfg.database.createLocally (mkDefault localDatabaseUrl);
        broker.url = mkIf cfg.redis.createLocally (mkDefault localBrokerUrl);
        evaluator.work_dir = mkDefault "/var/lib/circus/evaluator";
        logs.log_dir = mkDefault "/var/lib/circus/logs";
        cache.cache_dir = mkDefault "/var/lib/circus/cache";
        gc.gc_roots_dir = mkDefault "/nix/var/nix/gcroots/circus";
      };

      users.users.${cfg.user} = {
        isSystemUser = true;
        group = cfg.group;
        home = "/var/lib/circus";
        description = "Circus CI daemons";
        extraGroups = lib.optional cfg.redis.createLocally "redis-circus";
      };
      users.groups.${cfg.group} = { };

      environment.etc."circus/circus.toml".source = settingsFile;

      # the gcroots directory Circus keeps evaluations alive with
      systemd.tmpfiles.rules = [ "d ${gcRootsDir} 0755 ${cfg.user} ${cfg.group} - -" ];

      # builds go through the Nix daemon: the daemons' user imports and builds derivations
      nix.settings.trusted-users = [ cfg.user ];
      nix.nrBuildUsers = mkDefault cfg.buildUsers;

      systemd.services = {
        circus-migrate = {
          description = "Circus database migrations (before the daemons start)";
          wantedBy = [ "multi-user.target" ];
          # postgresql-setup.service (recent NixOS) creates the role and database
          after = [ "network-online.target" ] ++ localServices
            ++ lib.optional cfg.database.createLocally "postgresql-setup.service";
          wants = [ "network-online.target" ];
          requires = lib.optional cfg.database.createLocally "postgresql.service";
          before = map (d: "${d.name}.service") daemons;
          restartTriggers = [ settingsFile ];
          inherit environment;
          serviceConfig = hardening // {
            Type = "oneshot";
            RemainAfterExit = true;
            ExecStart = "${cfg.package}/bin/circus-migrate up";
          };
        };
      } // builtins.listToAttrs (map (d: {
        inherit (d) name;
        value = {
          inherit (d) description;
          wantedBy = [ "multi-user.target" ];
          after = [ "network-online.target" "circus-migrate.service" "nix-daemon.service" ]
            ++ localServices;
          wants = [ "network-online.target" ];
          requires = [ "circus-migrate.service" ] ++ localServices;
          restartTriggers = [ settingsFile ];
          path = [ pkgs.nix pkgs.git pkgs.openssh pkgs.nix-eval-jobs pkgs.zstd pkgs.xz ];
          inherit environment;
          serviceConfig = hardening // {
            Type = "simple";
            ExecStart = "${cfg.package}/bin/${d.name}${d.args or ""}";
            Restart = "on-failure";
            RestartSec = 5;
            # SIGTERM: the queue runner hands running builds back; the others stop at once.
            # Only the daemon gets it (mixed): the cgroup's other processes (its nix-store,
            # nix-eval-jobs) are its to stop, and get SIGKILL only after TimeoutStopSec
            KillSignal = "SIGTERM";
            KillMode = "mixed";
            TimeoutStopSec = 60;
          };
        };
      }) daemons);
    }

    (mkIf cfg.database.createLocally {
      services.postgresql = {
        enable = true;
        ensureDatabases = [ cfg.user ];
        ensureUsers = [ { name = cfg.user; ensureDBOwnership = true; } ];
      };
    })

    (mkIf cfg.redis.createLocally {
      services.redis.servers.circus = {
        enable = true;
        port = 0; # Unix socket only: /run/redis-circus/redis.sock
        unixSocketPerm = 660;
      };
    })

    (mkIf cfg.nginx.enable {
      services.circus.settings.server = {
        base_url = mkDefault "${if cfg.nginx.forceSSL then "https" else "http"}://${cfg.nginx.hostName}";
        trusted_proxies = mkDefault [ "127.0.0.1" "::1" ];
        force_secure_cookies = mkDefault cfg.nginx.forceSSL;
      };
      services.nginx = {
        enable = true;
        recommendedProxySettings = true;
        recommendedTlsSettings = true;
        virtualHosts.${cfg.nginx.hostName} = {
          inherit (cfg.nginx) forceSSL enableACME;
          sslCertificate = cfg.nginx.sslCertificate;
          sslCertificateKey = cfg.nginx.sslCertificateKey;
          locations."/" = {
            proxyPass = "http://127.0.0.1:${toString (lib.attrByPath [ "server" "port" ] 3000 cfg.settings)}";
            proxyWebsockets = true;
            extraConfig = ''
              client_max_body_size ${toString (lib.attrByPath [ "server" "max_body_size" ] 10485760 cfg.settings)};
              proxy_read_timeout 3600s;
            '';
          };
        };
      };
    })
  ]);
}
