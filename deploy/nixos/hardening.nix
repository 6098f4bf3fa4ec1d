# systemd sandboxing shared by the Circus units (services.circus and services.circus-agent):
# a read-only system, no home directories, private /tmp and devices, no privileges or
# capabilities; each module adds its user, state directory and writable paths.
{
  ProtectSystem = "strict";
  ProtectHome = true;
  PrivateTmp = true;
  PrivateDevices = true;
  NoNewPrivileges = true;
  CapabilityBoundingSet = "";
  AmbientCapabilities = "";
  ProtectKernelTunables = true;
  ProtectKernelModules = true;
  ProtectControlGroups = true;
  RestrictSUIDSGID = true;
  LockPersonality = true;
  RestrictNamespaces = true;
  RestrictRealtime = true;
  SystemCallArchitectures = "native";
  UMask = "0027";
}
