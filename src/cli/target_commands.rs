//! The targets' runtime commands: `ublkdm mirror ...` and `ublkdm snapshot ...`.

use super::*;

/// Sends a mirror command to the device's daemon and prints its answer.
pub(super) fn mirror_command(command: MirrorCommand) -> Result<()> {
    init_cli_logging();
    let (id, name, args) = match command {
        MirrorCommand::FailLeg { id, slot } => {
            (id, "fail-leg", serde_json::json!({ "slot": slot }))
        }
        MirrorCommand::RemoveLeg { id, slot } => {
            (id, "remove-leg", serde_json::json!({ "slot": slot }))
        }
        MirrorCommand::AddLeg { id, device, force } => {
            let device = absolute(device)?;
            (
                id,
                "add-leg",
                serde_json::json!({ "device": device, "force": force }),
            )
        }
        MirrorCommand::ReplaceLeg {
            id,
            slot,
            device,
            force,
        } => {
            let device = absolute(device)?;
            let args = serde_json::json!({ "slot": slot, "device": device, "force": force });
            (id, "replace-leg", args)
        }
        MirrorCommand::Scrub { id, repair } => {
            (id, "scrub", serde_json::json!({ "repair": repair }))
        }
    };
    let info = ublk::query(id)?;
    if !matches!(info.spec, Some(TargetSpec::Mirror { .. })) {
        return Err(Error::invalid(format!(
            "device {id} is not a mirror ({})",
            describe(info.spec.as_ref())
        )));
    }
    let command = Command::Target {
        name: name.to_owned(),
        args,
    };
    let reply = control::request(id, command)?;
    println!("{}", serde_json::to_string(&reply).expect("json"));
    Ok(())
}

/// Sends a snapshot command to the origin's daemon and prints its answer.
pub(super) fn snapshot_command(command: SnapshotCommand) -> Result<()> {
    init_cli_logging();
    let (id, name, args) = match command {
        SnapshotCommand::Create { id, name } => {
            (id, "snapshot-create", serde_json::json!({ "name": name }))
        }
        SnapshotCommand::List { id, json } => return snapshot_list(id, json),
        SnapshotCommand::Delete { id, name } => {
            (id, "snapshot-delete", serde_json::json!({ "name": name }))
        }
        SnapshotCommand::Merge { id, name } => (id, "merge", serde_json::json!({ "name": name })),
    };
    require_origin(id)?;
    let command = Command::Target {
        name: name.to_owned(),
        args,
    };
    let reply = control::request(id, command)?;
    match name {
        "snapshot-create" => println!("{}", reply["device"].as_str().unwrap_or("-")),
        "snapshot-delete" => println!("deleted snapshot {}", text(&reply["deleted"])),
        _ => println!(
            "merging snapshot {} into device {id}: {} chunks; follow with 'ublkdm status {id} \
             --watch'",
            text(&reply["merging"]),
            reply["total"]
        ),
    }
    Ok(())
}

/// Fails unless device `id` is a snapshot origin (pointing a snapshot's id at its origin).
pub(super) fn require_origin(id: u32) -> Result<()> {
    let info = ublk::query(id)?;
    match info.spec.as_ref() {
        Some(TargetSpec::Origin { .. }) => Ok(()),
        Some(TargetSpec::Child { parent, name, .. }) => Err(Error::invalid(format!(
            "device {id} is snapshot '{name}'; give its origin, device {parent}"
        ))),
        other => Err(Error::invalid(format!(
            "device {id} is not a snapshot origin ({})",
            describe(other)
        ))),
    }
}

/// The snapshots of origin `id` with the devices serving them.
pub(super) fn snapshot_rows(id: u32) -> Result<Vec<serde_json::Value>> {
    require_origin(id)?;
    let status = control::request(id, Command::Status)?;
    let children = status["children"].as_array().cloned().unwrap_or_default();
    let snapshots = status["target"]["status"]["snapshots"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    Ok(snapshots
        .into_iter()
        .map(|mut snap| {
            let child = children.iter().find(|c| c["name"] == snap["name"]);
            snap["id"] = child.map_or(serde_json::Value::Null, |c| c["id"].clone());
            snap["device"] = child.map_or(serde_json::Value::Null, |c| c["device"].clone());
            snap
        })
        .collect())
}

pub(super) fn snapshot_list(id: u32, json: bool) -> Result<()> {
    let rows = snapshot_rows(id)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows).expect("json"));
        return Ok(());
    }
    println!(
        "{:<20} {:<9} {:<13} {:>10}  REASON",
        "NAME", "STATE", "DEVICE", "EXCEPTIONS"
    );
    for row in &rows {
        println!(
            "{:<20} {:<9} {:<13} {:>10}  {}",
            row["name"].as_str().unwrap_or("?"),
            row["state"].as_str().unwrap_or("?"),
            row["device"].as_str().unwrap_or("-"),
            row["exceptions"],
            row["reason"].as_str().unwrap_or("")
        );
    }
    Ok(())
}
